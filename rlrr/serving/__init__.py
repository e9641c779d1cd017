"""Serving many tasks on one frozen backbone: the adapter bank (mixed-task batches) and its HTTP service."""
