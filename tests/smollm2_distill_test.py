"""Where CODI's distillation token falls with SmolLM2's real tokenizer, on real GSM8k answers.

The reference distils at ":" for GPT-2 and at the lone " " token that Llama-3's tokenizer puts
between ":" and the digits. SmolLM2 (a Llama-architecture model with its own BPE) splits numbers
into single digits after a lone space too, so the distilled token is that space (offset 1).
"""

import pytest
import shared_data

from codi_jax.data import codi_batches, sources
from codi_jax.models import loader, tokenizer_gguf


@pytest.fixture(scope="module")
def smol_tokenizer():
  return tokenizer_gguf.from_gguf(loader.resolve("smollm2")[1])


def test_smollm2_distills_at_the_lone_space(smol_tokenizer):
  tok = smol_tokenizer
  assert codi_batches.infer_distill_offset(tok) == 1
  ids = tok.encode("The answer is: 18", add_special_tokens=False)
  assert [tok.decode([i]) for i in ids] == ["The", " answer", " is", ":", " ", "1", "8"]


def test_every_real_gsm8k_answer_distills_before_its_first_digit(smol_tokenizer):
  """All 7,470 GSM8k-Aug-style training records tokenize with the offset checked per answer:
  the token after the distilled one starts the answer value (tokenize_records raises if not)."""
  path = shared_data.path("gsm8k", "train.jsonl")
  records, report = sources.read_train_source("gsm8k-aug", str(path))
  assert report["kept"] == 7470
  V = smol_tokenizer.vocab_size
  examples, rep = codi_batches.tokenize_records(
    records, smol_tokenizer, pad_id=V, bot_id=V + 1, eot_id=V + 2, distill_offset=1,
    max_token_num=None,
  )  # fmt: skip
  assert rep["kept"] == 7470
  for i in (0, 100, 7469):  # spot checks: the distilled token is " ", the next one a digit
    ex = examples[i]
    a = list(ex["answer"])
    assert smol_tokenizer.decode([a[ex["distill"]]]) == " "
    assert smol_tokenizer.decode([a[ex["distill"] + 1]]).isdigit()
