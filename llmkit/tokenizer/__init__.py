from .core import (CHATML_TEMPLATE, DEFAULT_SPECIAL_TOKENS, END_OF_TURN_TOKENS, GGUF_PRE_TOKENIZER_SPLITS,
                   StreamDecoder, Tokenizer, bytes_to_unicode, read_gguf_tokenizer_metadata)
