"""Operations a decode step issues, from callgrind dumps of `loraloom bench --what
decode_phases`, one per decode step: zeroed on entering `Decoder::decode_step_from` and dumped
on leaving it (see scripts/decode_ops.sh; callgrind counts calls outside a `--toggle-collect`
function too, so that option would not isolate the steps).

On a GPU a decode step is bound by the host issuing operations (BENCHMARKS.md, fourth GPU
session), so their number per step is the figure to bring down. Prints, per decode step:
  tch_ops     calls into libtorch's C API from Rust (`atg_*`, `at_copy_`, ...), split into
              views (no kernel: view, reshape, narrow, select, ...) and the others (on a GPU,
              about one kernel launch each)
  dispatcher  entries into libtorch's dispatcher (`at::_ops::*::call`), the views among them;
              this counts the operations libtorch's own composite ops call too
usage: python3 scripts/decode_ops.py DUMP...
"""

import collections
import json
import re
import sys

VIEWS = {
    "view", "reshape", "narrow", "select", "t", "tr", "transpose", "unsqueeze", "squeeze",
    "squeeze_dim", "split_with_sizes", "view_as", "alias", "as_strided", "expand", "permute",
    "_reshape_alias", "slice", "slice_Tensor", "unflatten", "_unsafe_view", "detach",
    "split_Tensor", "flatten_using_ints", "expand_as", "select_int", "transpose_int",
}
# Calls that only read or release a handle (sizes, device, drop): no operation.
HANDLES = {"at_free", "at_dim", "at_shape", "at_shallow_clone", "at_device", "at_scalar_type",
           "at_stride", "at_defined", "at_requires_grad", "at_new_tensor"}


def main(paths: list) -> None:
    calls: collections.Counter = collections.Counter()
    for path in paths:
        read(path, calls)
    summary(calls, len(paths))


def read(path: str, calls: collections.Counter) -> None:
    """Adds the call counts of one dump (callgrind's compressed names resolved) to `calls`."""
    names: dict = {}
    caller = callee = ""

    def resolve(field: str) -> str:
        m = re.match(r"\((\d+)\)(?: (.*))?", field)
        if not m:
            return field
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), m.group(1))

    with open(path) as f:
        for line in f:
            if line.startswith("fn="):
                caller = resolve(line[3:].rstrip("\n"))
            elif line.startswith("cfn="):
                callee = resolve(line[4:].rstrip("\n"))
            elif line.startswith("calls="):
                calls[(caller, callee)] += int(line[6:].split()[0])


def summary(calls: collections.Counter, steps: int) -> None:
    tch: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    for (_, callee), n in calls.items():
        m = re.match(r"at::_ops::(\w+)::call\(", callee)
        if m:
            ops[m.group(1)] += n
        elif re.match(r"(atg_|at_)\w+$", callee) and callee not in HANDLES:
            tch[callee] += n
    per = lambda n: round(n / steps, 1)  # noqa: E731
    tch_views = sum(n for k, n in tch.items() if re.sub(r"^atg_", "", k) in VIEWS)
    op_views = sum(n for k, n in ops.items() if k in VIEWS)
    print(json.dumps({
        "what": "decode_ops", "steps": steps,
        "tch_ops": per(sum(tch.values())), "tch_views": per(tch_views),
        "tch_others": per(sum(tch.values()) - tch_views),
        "dispatcher": per(sum(ops.values())), "dispatcher_views": per(op_views),
        "tch_by_name": {k: per(n) for k, n in tch.most_common()},
    }))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
