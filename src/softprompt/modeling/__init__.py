"""The frozen base model: loading it (`load`: device, dtype, checks) and spreading it over
processes and memory (`sharding`: FSDP, gradient checkpointing). Imports nothing from forward,
training or the CLI."""
