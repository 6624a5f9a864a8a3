#!/usr/bin/env python3
"""A llama-architecture GGUF of a given shape with random weights, for decode-speed runs on a
machine that cannot download a model (decode speed does not depend on the weights' values).

Linear weights and the token embedding are Q4_0 (random nibbles, scale 0.01), the output
matrix Q8_0, norms F32 ones; an SPM vocabulary of bytes and single characters. One random array per distinct shape
is written for every layer (the file still holds every tensor).


    synthetic_model.py OUT.gguf N_LAYER N_EMBD N_HEAD N_HEAD_KV N_FF [N_VOCAB] [N_CTX] [ROPE_BASE]
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType


def blocks(rng, rows: int, cols: int, block: int, nbytes: int, scale: float) -> np.ndarray:
    """``rows`` rows of ``cols // block`` random blocks of ``nbytes`` bytes whose first two bytes
    are the F16 scale (Q4_0 and Q8_0 both start with it)."""
    assert cols % block == 0
    a = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    a[:, :, 0:2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    return a.reshape(rows, -1)


def main(argv: list[str]) -> None:
    out = argv[0]
    n_layer, n_embd, n_head, n_head_kv, n_ff = map(int, argv[1:6])
    n_vocab = int(argv[6]) if len(argv) > 6 else 32000
    n_ctx = int(argv[7]) if len(argv) > 7 else 32768
    rope_base = float(argv[8]) if len(argv) > 8 else 10000.0
    d = n_embd // n_head
    rng = np.random.default_rng(0)
    q4 = GGMLQuantizationType.Q4_0

    w = GGUFWriter(out, "llama")
    w.add_name(f"synthetic llama L{n_layer} E{n_embd} H{n_head}/{n_head_kv} FF{n_ff}")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(2)  # mostly Q4_0

    toks = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    # single characters (and the word-start mark) so text takes about a token per character
    toks += ["\u2581".encode()] + [chr(c).encode() for c in range(33, 127)]
    types += [TokenType.NORMAL] * 95
    toks += [f"t{i}".encode() for i in range(n_vocab - len(toks))]
    types += [TokenType.NORMAL] * (n_vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def q4_0(rows, cols):
        return blocks(rng, rows, cols, 32, 18, 0.01)

    shapes = {"q": (n_head * d, n_embd), "kv": (n_head_kv * d, n_embd), "o": (n_embd, n_head * d),
              "up": (n_ff, n_embd), "down": (n_embd, n_ff)}
    data = {k: q4_0(*v) for k, v in shapes.items()}
    ones = np.ones(n_embd, np.float32)
    w.add_tensor("token_embd.weight", q4_0(n_vocab, n_embd), raw_dtype=q4)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", blocks(rng, n_vocab, n_embd, 32, 34, 0.001),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "ffn_norm.weight", ones)
        for name, key in (("attn_q", "q"), ("attn_k", "kv"), ("attn_v", "kv"), ("attn_output", "o"),
                          ("ffn_gate", "up"), ("ffn_up", "up"), ("ffn_down", "down")):
            w.add_tensor(p + name + ".weight", data[key], raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1:])
