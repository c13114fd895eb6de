"""The worker: Huey's consumer running the appliance's background jobs (appliance/jobs.py)."""
