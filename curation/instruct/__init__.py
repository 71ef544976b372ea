"""Instruction data: LLaVA-form conversations from kept records, their generators and pre-tokenizing."""

from curation.instruct.conversation import (
    MEDIA_TOKENS,
    FormatReject,
    build_conversation,
    check_conversation,
    check_record,
    instruction_conversation,
    media_token_problem,
    pretrain_conversation,
)
from curation.instruct.generators import GENERATORS, InstructionGenerator
from curation.instruct.tokenize import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    MEDIA_TOKEN_INDEX,
    load_tokenizer,
    tokenize_conversation,
    tokenizer_fingerprint,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "GENERATORS",
    "IGNORE_INDEX",
    "MEDIA_TOKENS",
    "MEDIA_TOKEN_INDEX",
    "FormatReject",
    "InstructionGenerator",
    "build_conversation",
    "check_conversation",
    "check_record",
    "instruction_conversation",
    "load_tokenizer",
    "media_token_problem",
    "pretrain_conversation",
    "tokenize_conversation",
    "tokenizer_fingerprint",
]
