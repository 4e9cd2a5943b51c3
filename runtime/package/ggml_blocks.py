"""GPTQ integers as GGML blocks, without re-quantizing: the one encoding in the `gguf` format written by hand.

A symmetric GPTQ weight is `s · (q − z)`: an integer difference `q − z` and one scale per group of input
columns. GGML's 32-weight blocks hold exactly that when each block lies inside one group:

- Q4_0: `d` (fp16) then 16 bytes, `w = d · (c − 8)` with `c` in [0, 15]; byte j holds c[j] in its low nibble
  and c[j + 16] in its high one. Exact for `q − z` in [−8, 7]: every 2-, 3- and 4-bit symmetric code.
- Q8_0: `d` (fp16) then 32 int8, `w = d · c`. Exact for `q − z` in [−128, 127]: every 8-bit symmetric code.

No library transcodes GPTQ's integers (gguf's and llama.cpp's quantizers choose their own scales from float
weights), hence this module. `tests/test_ggml_blocks.py` checks it against gguf's own dequantizer.
"""

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
BLOCK = 32


def block_type(bits: int) -> Q:
    """The GGML type that holds a symmetric GPTQ code of `bits` exactly."""
    return Q.Q8_0 if bits > 4 else Q.Q4_0


def _check(differences: np.ndarray, scales: np.ndarray, low: int, high: int) -> None:
    rows, columns = differences.shape
    if columns % BLOCK:
        raise ValueError(f"rows of {columns} weights do not split into blocks of {BLOCK}")
    if scales.shape != (rows, columns // BLOCK) or scales.dtype != np.float16:
        raise ValueError(f"scales must be float16 of shape {(rows, columns // BLOCK)}, got {scales.dtype} {scales.shape}")
    if differences.min(initial=0) < low or differences.max(initial=0) > high:
        raise ValueError(f"integer codes outside [{low}, {high}] do not fit this block type")


def encode(differences: np.ndarray, scales: np.ndarray, qtype: Q) -> np.ndarray:
    """Rows of integer differences `q − z` [rows, columns] and one fp16 scale per 32-block [rows, columns/32]
    as GGML blocks of `qtype` (Q4_0 or Q8_0): uint8 [rows, bytes per row], as `gguf.GGUFWriter` takes raw data."""
    if qtype == Q.Q4_0:
        return _q4_0(differences, scales)
    if qtype == Q.Q8_0:
        return _q8_0(differences, scales)
    raise ValueError(f"no exact encoding into {qtype.name}")


def _q4_0(differences: np.ndarray, scales: np.ndarray) -> np.ndarray:
    _check(differences, scales, -8, 7)
    rows, columns = differences.shape
    codes = (differences.astype(np.int16) + 8).astype(np.uint8).reshape(rows, columns // BLOCK, BLOCK)
    nibbles = codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)
    d = scales.astype("<f2").reshape(rows, columns // BLOCK, 1).view(np.uint8)
    return np.concatenate([d, nibbles], axis=-1).reshape(rows, -1)


def _q8_0(differences: np.ndarray, scales: np.ndarray) -> np.ndarray:
    _check(differences, scales, -128, 127)
    rows, columns = differences.shape
    codes = differences.astype(np.int8).reshape(rows, columns // BLOCK, BLOCK).view(np.uint8)
    d = scales.astype("<f2").reshape(rows, columns // BLOCK, 1).view(np.uint8)
    return np.concatenate([d, codes], axis=-1).reshape(rows, -1)
