"""Write recipes/demo/tiny_llama/: a tiny LLaMA config (no weights) and a character-level fast tokenizer.

    python recipes/demo/make_tiny_llama.py                      # (re)writes recipes/demo/tiny_llama/
    python recipes/demo/make_tiny_llama.py --out /tmp/tiny --layers 2 --hidden 128

The model has no weights on purpose: recipes/sft.py builds it with `model.random_init=true` and the demo
trains it from scratch. Every character is one token (a WordLevel vocabulary of printable ASCII, one token per
character, `<unk>` for anything else), so offsets map 1:1 onto the rendered chat and the assistant mask is
exact.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

PAD, BOS, EOT, UNK = "<pad>", "<s>", "<|eot|>", "<unk>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = [f"<|{role}|>" for role in ROLES]
SPECIALS = [PAD, BOS, EOT, UNK, *ROLE_TOKENS]
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n" + string.punctuation

# One turn = role token, content, end-of-turn (= eos). The assistant's content and its end-of-turn sit inside
# {% generation %} so `apply_chat_template(..., return_assistant_tokens_mask=True)` marks them; the model learns
# to stop by predicting <|eot|>. add_generation_prompt appends the assistant role token.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles are system, user and assistant; got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own piece ([\s\S] so newlines split too); special tokens are matched before this
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters back without spaces
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_config(tokenizer, args) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=args.tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "tiny_llama"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--max-positions", type=int, default=128)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.max_positions)
    # save_jinja_files=False: the chat template goes into tokenizer_config.json
    tokenizer.save_pretrained(out, save_jinja_files=False)
    build_config(tokenizer, args).save_pretrained(out)
    print(f"wrote {out}: vocab {len(tokenizer)}, {args.layers} layers x {args.hidden} hidden")


if __name__ == "__main__":
    main()
