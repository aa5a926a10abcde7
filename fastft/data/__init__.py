"""Data: loading documents, tokenising, packing, and the masked-LM / causal-LM collators.

    docs   = load_documents("corpus.txt")                       # one document per line
    tokens = tokenize_documents(docs, tokenizer, num_proc=4)     # batched map
    blocks = pack_documents(tokens, block_size=128)              # + document_starts
    batch  = MaskedLMCollator(tokenizer)(list_of_blocks)         # 15%, 80/10/10
    batch  = to_device(collator(fetch(dataset, indices)), device)  # what a loop does per step
"""

from fastft.data.batching import count_tokens, fetch, to_device
from fastft.data.collators import IGNORE_INDEX, CausalLMCollator, MaskedLMCollator, PadCollator, pad_id_of
from fastft.data.loading import TXT_MODES, document_end_id, load_documents, load_rows, rows_of, tokenize_documents
from fastft.data.nsp import build_nsp_pairs, split_sentences
from fastft.data.packing import pack_documents
from fastft.data.pipeline import LM_OBJECTIVES, is_tokenized, prepare_lm_data
from fastft.data.sampler import EpochBatches
from fastft.data.toy import toy_corpus, toy_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "PadCollator",
    "EpochBatches",
    "LM_OBJECTIVES",
    "MaskedLMCollator",
    "TXT_MODES",
    "build_nsp_pairs",
    "count_tokens",
    "fetch",
    "document_end_id",
    "is_tokenized",
    "load_documents",
    "load_rows",
    "pack_documents",
    "pad_id_of",
    "prepare_lm_data",
    "rows_of",
    "split_sentences",
    "to_device",
    "tokenize_documents",
    "toy_corpus",
    "toy_tokenizer",
]
