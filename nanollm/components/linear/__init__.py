"""Linear-attention and recurrent mixers: a state of fixed size per sequence in place of a growing KV cache."""
