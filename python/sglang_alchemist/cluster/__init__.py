"""Replicas: N servers, one adapter lineage (``launch_cluster``, lockstep training, front door)."""
