"""Linear-attention mixers: recurrent mixers with a matrix-valued state, each with chunked, recurrent and naive forms."""
