"""Readouts: what is read off the frozen model's hidden states after the prompt and a row.

- label words (`words`): the LM head's logits for each label's tokens, as a training loss or
  label scores;
- a trained classification head (`head`): a linear layer on the final layer's state at the
  row's last token (PEFT's SEQ_CLS form), or on the row's mean-pooled states of middle layers.
"""
