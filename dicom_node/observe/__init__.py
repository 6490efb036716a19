"""What the node tells people and machines about itself: metrics, the audit trail, log lines."""
