"""Data: loading documents, tokenising, packing, and the masked-LM / causal-LM collators.

    docs   = load_documents("corpus.txt")                       # one document per line
    tokens = tokenize_documents(docs, tokenizer, num_proc=4)     # batched map
    blocks = pack_documents(tokens, block_size=128)              # + document_starts
    batch  = MaskedLMCollator(tokenizer)(list_of_blocks)         # 15%, 80/10/10
"""

from fastft.data.collators import CausalLMCollator, MaskedLMCollator, pad_id_of
from fastft.data.loading import TXT_MODES, document_end_id, load_documents, tokenize_documents
from fastft.data.nsp import build_nsp_pairs, split_sentences
from fastft.data.packing import pack_documents
from fastft.data.pipeline import LM_OBJECTIVES, is_tokenized, prepare_lm_data
from fastft.data.sampler import EpochBatches
from fastft.data.toy import toy_corpus, toy_tokenizer

__all__ = [
    "CausalLMCollator",
    "EpochBatches",
    "LM_OBJECTIVES",
    "MaskedLMCollator",
    "TXT_MODES",
    "build_nsp_pairs",
    "document_end_id",
    "is_tokenized",
    "load_documents",
    "pack_documents",
    "pad_id_of",
    "prepare_lm_data",
    "split_sentences",
    "tokenize_documents",
    "toy_corpus",
    "toy_tokenizer",
]
