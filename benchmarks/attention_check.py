r"""One attention kernel against the einsum path at CODI's shapes: values, gradients and time.

  python benchmarks/attention_check.py --impl=cudnn                 # a GPU: cuDNN's fused kernel
  python benchmarks/attention_check.py --impl=dot_product --smoke   # tiny shapes (CPU, seconds)

Cases (bf16, Llama-3.2-1B's heads: 32 on 8 kv heads of 64): a training pass over left-padded
causal rows (forward and the gradients of q, k, v; odd and even lengths, fully masked pad rows) and
a decoding step (one query over a 256-slot cache, forward only). Per case and output (out, dq, dk,
dv) it prints the largest error of the kernel and of the einsum path ("xla"), both in bf16, from
the einsum path in f32, over the largest value; the median time of each bf16 call; and whether the
compiled program calls cuDNN. Exit 1 when the kernel fails, calls cuDNN where `cudnn_fits` says
no (or not where it says yes), or errs by more than max(--tol, 2 x the einsum path's bf16 error):
launch/device_check.sh then runs the accelerator benchmark with the einsum path instead.
"""
# pylint: disable=invalid-name

from __future__ import annotations

import os
import statistics
import sys
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

# Run as a script: the repository root holds codi_jax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from codi_jax.models.config import AttentionImpl
from codi_jax.models.layers import attention, cudnn_fits

FLAGS = flags.FLAGS
flags.DEFINE_enum("impl", "cudnn", typing.get_args(AttentionImpl)[1:], "kernel checked vs xla")
flags.DEFINE_bool("smoke", False, "tiny shapes (CPU)")
flags.DEFINE_float("tol", 1e-2, "error always allowed (bf16 rounds at 4e-3 of a value)")
flags.DEFINE_integer("reps", 10, "timed calls per kernel and case (median)")

# name: (batch, query length, key length, heads, kv heads, head dim, gradients)
FULL = {
  "encoder": (32, 65, 65, 32, 8, 64, True),
  "teacher": (32, 144, 144, 32, 8, 64, True),
  "decode": (64, 1, 256, 32, 8, 64, False),
}
SMOKE = {
  "odd": (2, 7, 7, 4, 2, 8, True),
  "even": (2, 8, 8, 4, 2, 8, True),
  "decode": (2, 1, 16, 4, 2, 8, False),
}
CUDNN_CALL = "__cudnn$fmha"  # the custom call jax lowers cuDNN's fused attention to


def case_inputs(B, L, T, H, K, Dh, seed=0):
  """q, k, v and a cotangent (f32), and a causal mask over left-padded rows (row b has
  b * T // (2B) pads; a query sees the keys up to its own position, which the last L keys hold)."""
  rng = np.random.default_rng(seed)
  q, k, v, cot = (
    jnp.asarray(rng.normal(size=s), jnp.float32)
    for s in ((B, L, H, Dh), (B, T, K, Dh), (B, T, K, Dh), (B, L, H * Dh))
  )
  pads = np.arange(B) * T // (2 * B)
  key = np.arange(T)[None, None]
  query = (T - L + np.arange(L))[None, :, None]
  allowed = (key <= query) & (key >= pads[:, None, None])
  return q, k, v, cot, jnp.asarray(allowed)


def run_case(impl: str, inputs, grads: bool, reps: int, dtype=jnp.bfloat16):
  """(outputs as float32 arrays, median seconds or nan, whether the program calls cuDNN's
  attention) of the jitted forward (+ q/k/v gradients) with inputs in `dtype`."""
  args = (*(x.astype(dtype) for x in inputs[:4]), inputs[4])  # the mask an argument, as in a model

  def fn(q, k, v, cot, allowed):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, allowed, impl=impl), q, k, v)
    return (out, *vjp(cot)) if grads else out

  f = jax.jit(fn)
  fused = CUDNN_CALL in f.lower(*args).as_text()
  out = jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  outs = out if isinstance(out, tuple) else (out,)
  median = statistics.median(times) if times else float("nan")
  return [np.asarray(x, np.float32) for x in outs], median, fused


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
  """max |a - ref| / max |ref| (inf where a is not finite)."""
  if not np.isfinite(a).all():
    return float("inf")
  return float(np.max(np.abs(a - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def main(argv):
  del argv
  cases = SMOKE if FLAGS.smoke else FULL
  dev = jax.devices()[0]
  print(
    f"attention check: {FLAGS.impl} vs xla | device {dev.platform} {dev.device_kind} | jax "
    f"{jax.__version__} | errors of bf16 from xla in f32, over the largest value; allowed "
    f"max({FLAGS.tol:g}, 2 x xla's)",
    flush=True,
  )
  ok = True
  for name, (B, L, T, H, K, Dh, grads) in cases.items():
    inputs = case_inputs(B, L, T, H, K, Dh)
    expect_fused = FLAGS.impl == "cudnn" and cudnn_fits(inputs[0].astype(jnp.bfloat16))
    truth, _, _ = run_case("xla", inputs, grads, 0, jnp.float32)
    ref, t_ref, _ = run_case("xla", inputs, grads, FLAGS.reps)
    try:
      got, t_got, fused = run_case(FLAGS.impl, inputs, grads, FLAGS.reps)
    except Exception as e:  # pylint: disable=broad-except  (report the kernel's refusal, go on)
      print(f"  {name}: {FLAGS.impl} FAILED: {type(e).__name__}: {str(e).splitlines()[0]}")
      ok = False
      continue
    errs = [(rel_err(g, t), rel_err(r, t)) for g, r, t in zip(got, ref, truth)]
    bad = any(e > max(FLAGS.tol, 2 * e_xla) for e, e_xla in errs)
    bad |= fused != expect_fused  # cuDNN where it fits, and only there
    ok &= not bad
    labels = ("out", "dq", "dk", "dv")[: len(errs)]
    print(
      f"  {name} B={B} L={L} T={T} H={H}/{K} Dh={Dh} ({'fwd+bwd' if grads else 'fwd'}): "
      + ", ".join(f"{lab} {e:.1e} (xla {e_xla:.1e})" for lab, (e, e_xla) in zip(labels, errs))
      + f" | {FLAGS.impl} {1e3 * t_got:.3f} ms, xla {1e3 * t_ref:.3f} ms | cuDNN call "
      + f"{'yes' if fused else 'no'}{'' if fused == expect_fused else ' (unexpected)'}"
      + (" | MISMATCH" if bad else ""),
      flush=True,
    )
  print(f"attention check: {'ok' if ok else 'FAILED'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
