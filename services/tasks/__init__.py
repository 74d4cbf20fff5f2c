"""Asynchronous inference: durable tasks on Redis Streams (or in process), run by runners
through the gateway's normal path (cache, then batcher)."""
