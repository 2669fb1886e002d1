"""Issue 17: property-based fuzzing of the ticket loader (a safetensors file with a mutated JSON header, or damaged
bytes) and of the CSR / bitmask array decoder (arrays of any dtype and shape under the names it reads): a result
or TicketError / ValueError naming the file or tensor, never another exception (see tests/fuzzing.py)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.fuzzing import damaged_bytes, mutated, own_errors_only
from vlsparse.pruning.ticket import Ticket
from vlsparse.sparse.csr import decode_sparse, encode_sparse


def _ticket_bytes() -> bytes:
    mask = {"layer.0.q.weight": torch.tensor([[True, False], [False, True]]), "layer.0.k.weight": torch.ones(2, 3) > 0}
    with tempfile.TemporaryDirectory() as d:
        Ticket(mask, {"model": "uniter-tiny", "method": "random"}).save(Path(d) / "t.safetensors")
        return (Path(d) / "t.safetensors").read_bytes()


_TICKET = _ticket_bytes()
_HEADER_LEN = struct.unpack("<Q", _TICKET[:8])[0]
_HEADER = json.loads(_TICKET[8:8 + _HEADER_LEN])


def _with_header(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + _TICKET[8 + _HEADER_LEN:]


@given(mutated(_HEADER).map(_with_header) | damaged_bytes(_TICKET))
def test_the_ticket_loader_raises_only_its_own_errors(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.safetensors"
        path.write_bytes(data)
        ticket = own_errors_only(lambda: Ticket.load(path), ["t.safetensors"])
        if ticket is not None:
            assert all(m.dtype == torch.bool for m in ticket.mask.values()) and 0.0 <= ticket.sparsity < 1.0


_W = torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
_VALID = {layout: {k: v.numpy() for k, v in encode_sparse(_W, _W != 0).to_tensors("w").items()}
          for layout in ("auto",)}
_KEYS = st.sampled_from(["w.crow_indices", "w.col_indices", "w.values", "w.shape", "w.bitmask"])
_ARRAYS = hnp.arrays(st.sampled_from([np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.bool_]),
                     hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6))


@st.composite
def _csr_arrays(draw):
    arrays = dict(_VALID["auto"])
    for key in draw(st.lists(_KEYS, max_size=3)):
        if draw(st.booleans()):
            arrays.pop(key, None)
        else:
            arrays[key] = draw(_ARRAYS)
    return arrays


@given(_csr_arrays(), st.sampled_from([None, (3, 4), (4, 3), (0, 4)]))
@example({**_VALID["auto"], "w.shape": np.zeros((1, 0), np.int16)}, None)  # found: a 2-D stored shape (TypeError)
def test_the_csr_decoder_raises_only_its_own_errors(arrays, shape):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    names = ["w.", "shape", "crow_indices", "col_indices", "values", "bitmask"]  # the array at fault
    csr = own_errors_only(lambda: decode_sparse(tensors, "w", shape=shape), names)
    if csr is not None:
        dense = csr.to_dense() if hasattr(csr, "to_dense") else None
        assert dense is None or dense.shape == tuple(csr.shape)
