"""What operators use: the dashboard and health endpoints, and the status/jobs/retry/resend commands."""
