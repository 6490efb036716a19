"""Receiving: the storage SCP, who may call it, and storing each instance durably before the
sender hears "success"."""
