"""How soft prompts combine with the frozen model's input.

Two ways to run a prompt [P, H] in front of input tokens [B, T]:
- `reference.concat_forward`: the reference (what PEFT does): concatenate prompt and token
  embeddings and run the whole model on [B, P+T].
- the shared-prefix path: with causal attention the virtual tokens never see the input, so
  their keys/values depend on the prompt alone. At inference (`kv.prefix_kv` +
  `kv.run_after_prefix`) the prompt runs once, its KV is cached and broadcast to the rows. In
  training (`loss.label_loss`) the prompt runs once per lane in the same pass as the rows packed
  after it, each row seeing the prompt and itself. Both equal the reference up to float rounding.

The rows of a batch run packed, not padded (`packed`): several rows share a lane of the batch,
each token seeing only its own row and its own prompt. Label scoring (`scoring`) also runs every
label's tokens in the same pass, as a trie after each row; `generate` decodes after the KV.

Each fast path is its own module, checked against `reference`. Imports point downward: kernels
never import training, the engine or CLI code.
"""
