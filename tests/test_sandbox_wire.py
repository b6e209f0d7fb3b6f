"""The isolated run's plain-data codec and its static rule for what runs in-process."""
import json
import math
from collections import Counter, OrderedDict, namedtuple
from decimal import Decimal

import pytest

from harness import get_task
from harness._wire import NotPlain, decode, encode
from harness.split import split_tests


def _across(value):
    return decode(json.loads(json.dumps(encode(value))))


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**200, -(2**70), 1.5, -0.0, math.inf, "", "é\n\x00", b"\x00\xff", bytearray(b"ab"),
    1 + 2j, [1, [2, (3, "x")]], (), ("a",), {1, 2}, frozenset({(1, 2)}), {}, {(1, 2): [3], "k": {4: None}, 5: b"z"},
])
def test_plain_values_cross_unchanged(value):
    out = _across(value)
    assert out == value and type(out) is type(value)


def test_nan_crosses():
    assert math.isnan(_across(float("nan")))


def test_subclasses_cross_as_their_base_type_and_lose_their_methods():
    class Liar(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    point = namedtuple("point", "x y")(1, 2)
    for value, base in ((Liar(3), int), (Counter("aab"), dict), (OrderedDict(a=1), dict), (point, tuple)):
        out = _across(value)
        assert type(out) is base and out == base(value)
    assert _across(Liar(3)) != 4


@pytest.mark.parametrize("value", [object(), len, lambda: 1, (i for i in ()), Decimal(1), [1, {2: object()}], range(3)])
def test_other_values_are_not_plain(value):
    with pytest.raises(NotPlain):
        encode(value)


@pytest.mark.parametrize("node", [
    [1, 2], {"l": [1], "t": [2]}, {"x": [1]}, {"l": 3}, {"d": [[{"l": []}, 1]]}, {"s": [{"l": [1]}]},
    {"b": "zz"}, {"c": [1, "2"]}, {"d": [[1]]},
])
def test_decoding_rejects_what_the_encoder_never_writes(node):
    with pytest.raises(NotPlain):
        decode(node)


def test_split_rule_reads_the_reference_and_the_tests():
    he = get_task("humaneval")
    zero = he.problems()[32]  # find_zero: the tests call poly and use math, both from the prompt
    split = he.isolated_tests(zero)
    assert split.isolated and split.calls == ("find_zero", "poly") and split.code.startswith("import math\n")
    mbpp = get_task("mbpp")
    tree = next(p for p in mbpp.problems() if p.task_id == "mbpp/367")
    assert "Node" in mbpp.isolated_tests(tree).fallback
    inspect = split_tests("def f():\n    pass\n", "f", "assert f.__doc__ is None\n")
    assert not inspect.isolated and "attributes of f" in inspect.fallback
    constant = split_tests("K = 3\ndef f():\n    return K\n", "f", "assert f() == K\n")
    assert not constant.isolated and "K" in constant.fallback
