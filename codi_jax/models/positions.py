"""Position ids of padded blocks: the one rule, in both padding modes.

"masked" (ours) counts each row from its first real token; the "official*" modes reproduce the
reference CODI code, whose positions are slot indices (pads count) of a batch padded to its
longest row. A left-padded bucket wider than that row acts as if it were not there: its leading
slots do not exist (`first_column`), which the model's attention honours too.

Shape legend: B batch, L block length.
"""
# pylint: disable=invalid-name

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

PaddingMode = Literal["masked", "official", "official_fixmask"]


def positions(mask_BxL: jax.Array, mode: PaddingMode = "masked") -> jax.Array:
  """Position ids [B, L]: per row from its first real token ("masked"; pads get 0), or the slot
  index counted from the batch's first real column ("official*")."""
  if mode == "masked":
    return jnp.maximum(jnp.cumsum(mask_BxL, axis=1) - 1, 0).astype(jnp.int32)
  B, L = mask_BxL.shape
  slots = jnp.arange(L, dtype=jnp.int32) - first_column(mask_BxL)
  return jnp.broadcast_to(jnp.maximum(slots, 0), (B, L))


def first_column(mask_BxL: jax.Array) -> jax.Array:
  """The first slot where any row has a real token ([] int32): earlier slots of a left-padded
  bucket are wider than the batch's longest row and, in the reference's terms, do not exist."""
  return jnp.argmax(jnp.any(mask_BxL, axis=0)).astype(jnp.int32)
