"""What a compiled XLA program reports about itself: cost model, memory, dots and collectives.

Read from `compiled.cost_analysis()`, `compiled.memory_analysis()` and the optimized HLO text
(`compiled.as_text()`). XLA's cost analysis counts a while-loop body once; the HLO walkers here
(`dot_flops`, `collectives`) multiply each body by its known trip count instead. Shared by
`codi_jax.compile` (programs compiled for a TPU topology) and `benchmarks/accelerator.py`.
Needs only jax and numpy (the accelerator benchmark's machine may have nothing else).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable

DOT_TERMS = {  # innermost source function of a dot -> formula term (`codi_jax.flops`)
  "Linear.__call__": "dense",
  "Embed.attend": "head",
  "Transformer.head": "head",
  "attention": "attention",
  "Projection.__call__": "prj",
}
# Collective ops by kind; async pairs count once, at their -done (whose result is the output).
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (?:\w+\[([\d,]*)\]\S*|\(.*?\)) ([\w\-]+)\(")
_RESULT = re.compile(r"^\s+(?:ROOT )?%?[\w.\-]+ = (.*?) ([\w\-]+)\(")
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8\w*)\[([\d,]*)\]")


def cost(compiled) -> dict:
  """`compiled.cost_analysis()` as one dict ({} if the backend reports none)."""
  try:
    c = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return {}
  return dict((c[0] if isinstance(c, (list, tuple)) else c) or {})


def cost_flops(compiled) -> float:
  """XLA's FLOP count of a compiled program (nan if not reported)."""
  return float(cost(compiled).get("flops", float("nan")))


def memory(compiled):
  """`compiled.memory_analysis()`, or None where the backend has none."""
  try:
    return compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None


def xla_bytes(compiled) -> float:
  """Arguments + outputs - aliased + temporaries of a compiled program (nan if not reported)."""
  m = memory(compiled)
  if m is None:
    return float("nan")
  return float(
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )


def _parse(hlo: str):
  """(computations {name: [(instr, dims, op, line)]}, entry name, source-function lookup)."""
  sec, funcs, locs, frames = None, {}, {}, {}
  comps, cur, entry = {}, None, None
  for line in hlo.split("\n"):
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      sec = line
    elif sec and line[:1].isdigit():
      i, rest = line.split(" ", 1)
      ids = dict(re.findall(r"(\w+)=(\d+)", rest))
      if sec == "FunctionNames":
        funcs[i] = rest.strip('"')
      elif sec == "FileLocations":
        locs[i] = ids["function_name_id"]
      elif sec == "StackFrames":
        frames[i] = ids["file_location_id"]
    elif line and not line[0].isspace() and line.endswith("{"):
      sec, is_entry = None, line.startswith("ENTRY ")
      cur = line.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
      comps[cur] = []
      entry = cur if is_entry else entry
    elif line == "}":
      cur = None
    elif cur is not None and (m := _INSTR.match(line)):
      comps[cur].append((m.group(1), m.group(2), m.group(3), line))

  def source(line: str) -> str | None:
    frame = re.search(r"stack_frame_id=(\d+)", line)
    return funcs.get(locs.get(frames.get(frame.group(1)))) if frame else None

  return comps, entry, source


def _cond_trips(comps) -> dict[str, int]:
  """{while instruction: trip count} for loops whose HLO states none (libtpu's): a counter (tuple
  element k) compared `i < N` to a constant N in the condition, from a constant start (else 0),
  stepped by a constant the body adds: ceil((N - start) / step); no entry where the body moves
  the counter otherwise. lax.scan and fori_loop
  counters step by 1; TPU collective-matmul windows step by 2."""
  instrs = {c: {i: (op, line) for i, _, op, line in body} for c, body in comps.items()}

  def operands(line: str, op: str) -> list[str]:
    m = re.search(rf" {re.escape(op)}\(([^)]*)\)", line)
    return re.findall(r"%?([\w.\-]+)", m.group(1)) if m else []

  def const(comp: str, name: str | None) -> int | None:
    """The value of an integer constant (through copies), else None."""
    op, line = instrs[comp].get(name, ("", ""))
    if op == "copy":
      return const(comp, next(iter(operands(line, op)), None))
    m = re.search(r"constant\((-?\d+)\)", line) if op == "constant" else None
    return int(m.group(1)) if m else None

  def less_than(comp: str, op: str, line: str) -> list[str]:
    """(a, b) of `a < b`: a compare, or a fusion of one compare of its two parameters in order."""
    if op == "compare":
      return operands(line, op) if "direction=LT" in line else []
    fused = re.search(r"calls=%?([\w.\-]+)", line) if op == "fusion" else None
    body = comps.get(fused.group(1) if fused else "", [])
    if not body or not body[-1][3].lstrip().startswith("ROOT") or body[-1][2] != "compare":
      return []
    order = {
      i: int(m.group(1)) for i, _, o, ln in body if (m := re.search(r"parameter\((\d+)\)", ln))
    }
    args = less_than(comp, "compare", body[-1][3])
    return operands(line, op) if [order.get(x) for x in args] == [0, 1] else []

  def element(comp: str, tup: str | None, k: int) -> str | None:
    """Operand k of the tuple instruction `tup` of `comp`."""
    op, line = instrs[comp].get(tup, ("", ""))
    args = operands(line, "tuple") if op == "tuple" else []
    return args[k] if k < len(args) else None

  def step(body: str, k: int) -> int | None:
    """The constant the body adds to counter k; None where the counter moves otherwise (e.g. a
    nested loop advances it: a decode's chunk of steps), so `i < N` does not count the trips."""
    root = next((i for i, _, _, line in comps[body] if line.lstrip().startswith("ROOT")), None)
    op, line = instrs[body].get(element(body, root, k), ("", ""))
    if op == "add" or (op == "fusion" and re.search(r"calls=%?[\w.\-]*add", line)):
      return next((c for x in operands(line, op) if (c := const(body, x))), None)
    return None

  out = {}
  for comp, body in comps.items():
    for name, _, op, line in body:
      cond = re.search(r"condition=%?([\w.\-]+)", line) if op == "while" else None
      if not cond or cond.group(1) not in instrs:
        continue
      loop_body = re.search(r"body=%?([\w.\-]+)", line).group(1)
      for cop, cline in instrs[cond.group(1)].values():
        args = less_than(cond.group(1), cop, cline)
        n = const(cond.group(1), args[1]) if len(args) == 2 else None
        if n is None:
          continue
        gop, gline = instrs[cond.group(1)].get(args[0], ("", ""))
        k = re.search(r"index=(\d+)", gline) if gop == "get-tuple-element" else None
        if not k or loop_body not in instrs:
          out[name] = n
          continue
        k = int(k.group(1))
        first = const(comp, element(comp, next(iter(operands(line, "while")), None), k)) or 0
        if by := step(loop_body, k):
          out[name] = max(0, -(-(n - first) // by))
  return out


def _trip(line: str, conds: dict[str, int], open_trips: int | None = None) -> int | None:
  """The trip count of a while instruction: known, or read off its condition (`_cond_trips`);
  else open_trips (the caller's count for an open-ended loop, e.g. a decode at its full budget)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  name = _INSTR.match(line)
  n = int(known.group(1)) if known else conds.get(name.group(1) if name else "")
  return n or open_trips


def loop_trips(hlo: str, open_trips: int | None = None) -> list[int]:
  """The trip counts of the program's while loops (known, read off `i < N` conditions, or
  open_trips for the others)."""
  comps, _, _ = _parse(hlo)
  conds = _cond_trips(comps)
  return [
    n
    for body in comps.values()
    for _, _, op, line in body
    if op == "while" and (n := _trip(line, conds, open_trips))
  ]


COST_KEYS = ("flops", "bytes accessed", "transcendentals")


def _computation_texts(hlo: str) -> tuple[str, dict[str, str]]:
  """(the module's text before its first computation, minus the HloModule line; {computation
  name: its text, in module order})."""
  head, texts, cur = [], {}, None
  for line in hlo.split("\n"):
    if cur is None and line and not line[0].isspace() and line.endswith("{"):
      cur = line.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
      texts[cur] = [line.removeprefix("ENTRY ")]
    elif cur is not None:
      texts[cur].append(line)
      cur = None if line == "}" else cur
    elif not texts and not line.startswith("HloModule"):
      head.append(line)
  return "\n".join(head), {k: "\n".join(v) for k, v in texts.items()}


def _as_module(head: str, texts: dict[str, str], entry: str) -> str:
  """HLO text of a module whose entry is the computation `entry` (with what it calls)."""
  names, todo = {entry}, [entry]
  while todo:
    for ref in re.findall(r"%?([\w.\-]+)", texts[todo.pop()].split("\n", 1)[-1]):
      if ref in texts and ref not in names:
        names.add(ref)
        todo.append(ref)
  body = [("ENTRY " if k == entry else "") + t for k, t in texts.items() if k in names]
  return "\n".join(["HloModule loop_body", head, *body])


def _xla_cost_fn() -> Callable[[str], dict[str, float] | None] | None:
  """HLO text -> XLA's generic cost analysis (HloCostAnalysis, run on this host's CPU client;
  None for a module it cannot parse); None where this jaxlib does not expose it."""
  try:
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src.lib import xla_client  # pylint: disable=import-outside-toplevel

    parse, analyse = xla_client.hlo.hlo_module_from_text, xla_client._xla.hlo_module_cost_analysis
    client = jax.local_devices(backend="cpu")[0].client
  except (ImportError, AttributeError, RuntimeError):
    return None

  def cost(text: str) -> dict[str, float] | None:
    try:
      return {k: float(v) for k, v in analyse(client, parse(text)).items()}
    except Exception:  # pylint: disable=broad-except  (an HLO this jaxlib cannot parse: counted once)
      return None

  return cost


def loop_costs(
  hlo: str, open_trips: int | None = None, backend: dict | None = None
) -> tuple[dict[str, float], int] | None:
  """(what XLA's cost analysis leaves out of an optimized HLO module, {COST_KEYS: amount}; the
  number of while loops still counted once). XLA counts every while body once; this adds, for
  each loop of known trip count n, n - 1 more times its body, nested loops weighted the same way:
  extra(C) = sum over C's loops of (n - 1) (cost(body) + extra(body)) + extra(body). A body's cost
  is XLA's generic analysis of the body as a module of its own (`_xla_cost_fn`; on a TPU program
  its FLOPs agree with the TPU's own analysis within 0.1%). A loop whose HLO states no trip count
  runs open_trips times (None: once). backend: the backend's own analysis of the whole program
  (`cost(compiled)`); each amount is then scaled by its ratio to the generic analysis of the whole
  program (the TPU's counts the bytes of padded tiles: 1.2x the generic count on GPT-2's step).
  None where jaxlib does not expose the analysis."""
  analyse = _xla_cost_fn()
  if analyse is None:
    return None
  comps, entry, _ = _parse(hlo)
  conds = _cond_trips(comps)
  head, texts = _computation_texts(hlo)
  once = 0

  def loops(comp: str, seen: set) -> list[tuple[int | None, str]]:
    """(trip, body) of the loops `comp` runs, directly or through calls (never into a body)."""
    out = []
    for _, _, op, line in comps.get(comp, ()):
      if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", line).group(1)
        out.append((_trip(line, conds, open_trips), body))
        continue
      for callee in re.findall(r"%?([\w.\-]+)", line.split("(", 1)[-1]):
        if callee in comps and callee != comp and callee not in seen:
          seen.add(callee)
          out += loops(callee, seen)
    return out

  memo: dict[str, collections.Counter] = {}

  def extra(comp: str) -> collections.Counter:
    nonlocal once
    if comp in memo:
      return memo[comp]
    out = collections.Counter()
    for trip, body in loops(comp, set()):
      inner = extra(body)
      out.update(inner)
      cost = analyse(_as_module(head, texts, body)) if trip and trip > 1 else None
      if trip is None or (trip > 1 and cost is None):
        once += 1
      elif cost is not None:
        for k in COST_KEYS:
          out[k] += (trip - 1) * (cost.get(k, 0.0) + inner[k])
    memo[comp] = out
    return out

  total = extra(entry)
  whole = analyse(_as_module(head, texts, entry)) if backend and entry else None
  scale = {
    k: backend[k] / whole[k] if whole and whole.get(k) and backend.get(k) else 1.0
    for k in COST_KEYS
  }
  return {k: float(total[k]) * scale[k] for k in COST_KEYS}, once


def _totals(comps, entry, count: Callable, open_trips: int | None = None) -> dict[str, float]:
  """Sum of `count(instr)` (a Counter) over the entry computation and everything it calls, every
  while body times its trip count (known, read off its condition, else open_trips or once)."""
  memo: dict[str, collections.Counter] = {}
  conds = _cond_trips(comps)

  def total(comp: str) -> collections.Counter:
    if comp in memo:
      return memo[comp]
    out = collections.Counter()
    for instr in comps.get(comp, ()):
      _, _, op, line = instr
      out.update(count(instr))
      trip = _trip(line, conds, open_trips) if op == "while" else None
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      callees = re.findall(r"(calls|to_apply|body)=%?([\w.\-]+)", line) + [
        ("branch", c) for c in re.findall(r"%?([\w.\-]+)", branches.group(1) if branches else "")
      ]
      for attr, callee in callees:
        n = trip if attr == "body" and trip else 1
        for key, v in total(callee).items():
          out[key] += n * v
    memo[comp] = out
    return out

  return {k: float(v) for k, v in total(entry).items()}


def dot_flops(hlo: str) -> dict[str, float]:
  """FLOPs of the dots of an optimized HLO module (`compiled.as_text()`) by formula term, every
  while body times its known trip count: 2 x output size x contracted size. The term is the dot's
  innermost source function (the module's stack-frame table, DOT_TERMS); a dot without one (XLA
  dropped its metadata) is "other". Dots as XLA:CPU keeps them; a backend that rewrites them into
  library calls or convolutions leaves them uncounted."""
  comps, entry, source = _parse(hlo)
  shapes = {
    name: [int(d) for d in dims.split(",") if d]
    for body in comps.values()
    for name, dims, _, _ in body
    if dims is not None
  }

  def count(instr) -> collections.Counter:
    _, dims, op, line = instr
    if op != "dot":
      return collections.Counter()
    lhs = shapes[re.search(r"dot\(%?([\w.\-]+)", line).group(1)]
    contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
    k = math.prod(lhs[int(d)] for d in contracted.split(",") if d)
    term = DOT_TERMS.get(source(line), "other")
    return collections.Counter({term: 2 * math.prod(int(d) for d in dims.split(",") if d) * k})

  return _totals(comps, entry, count)


def _result_bytes(line: str) -> int:
  """Bytes of an instruction's result (every array of a tuple result)."""
  m = _RESULT.match(line)
  total = 0
  for dtype, dims in _ARRAY.findall(m.group(1) if m else ""):
    total += _itemsize(dtype) * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _itemsize(dtype: str) -> int:
  """Bytes per element of an HLO element type (bf16, f32, s8, u4 -> 1, c64, f8e4m3fn, ...)."""
  if dtype in ("pred", "bf16") or dtype.startswith("f8"):
    return 2 if dtype == "bf16" else 1
  return max(1, int(re.sub(r"\D", "", dtype)) // 8)


def collectives(hlo: str, open_trips: int | None = None) -> dict[str, tuple[int, float]]:
  """{kind: (ops executed, bytes of their results)} of the collectives in an optimized HLO
  module, per device, loop bodies times their trip counts (`_totals`; an async pair counts once,
  at its -done)."""

  def count(instr) -> collections.Counter:
    _, _, op, line = instr
    kind = op.removesuffix("-done")
    if kind not in COLLECTIVES or op.endswith("-start"):
      return collections.Counter()
    return collections.Counter({f"{kind}#": 1, kind: _result_bytes(line)})

  comps, entry, _ = _parse(hlo)
  t = _totals(comps, entry, count, open_trips)
  return {k: (int(t[f"{k}#"]), t[k]) for k in COLLECTIVES if t.get(f"{k}#")}
