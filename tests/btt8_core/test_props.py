"""Random operation sequences against a dict model, with reopen and power cuts between ops."""

import random

import btt8
from btt8.core import Pool
from btt8_helpers import MIB, DurablePmem
from hypothesis import given, settings
from hypothesis import strategies as st

LBAS = st.one_of(st.integers(0, 5), st.sampled_from([27676, 27677]))
OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), LBAS, st.integers(0, 2**32)),
    st.tuples(st.just("zero"), LBAS, st.just(0)),
    st.tuples(st.just("read"), LBAS, st.just(0)),
    st.tuples(st.just("read_into"), LBAS, st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    st.tuples(st.just("power_cut"), st.just(0), st.just(0)),
), max_size=60)


@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_pool_behaves_like_a_dict_of_blocks(ops) -> None:
    pmem = DurablePmem(16 * MIB)
    pool = btt8.create_on(pmem, 512)
    model: dict[int, bytes] = {}
    buf = bytearray(512)
    for op, lba, seed in ops:
        expected = model.get(lba, bytes(512))
        if op == "write":
            data = random.Random(seed).randbytes(512)
            pool.write(lba, data)
            model[lba] = data
        elif op == "zero":
            pool.set_zero(lba)
            model.pop(lba, None)
        elif op == "read":
            assert pool.read(lba) == expected
        elif op == "read_into":
            pool.read_into(lba, buf)
            assert buf == expected
        elif op == "reopen":
            pool = Pool(pmem)
        else:  # every completed op must already be durable
            durable = DurablePmem(pmem.size)
            durable.store(0, pmem.durable)
            durable.durable[:] = pmem.durable
            pmem, pool = durable, Pool(durable)
    for lba in range(6):
        assert pool.read(lba) == model.get(lba, bytes(512))
