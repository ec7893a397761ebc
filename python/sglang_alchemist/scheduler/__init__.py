"""Scheduler-process side: SGLang's Scheduler with a training lane and control operations."""
