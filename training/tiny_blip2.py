# Copyright 2026 The blip2_ros Authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""
Build a small BLIP-2 from scratch, with a word-level tokenizer made locally.

The result is saved with ``save_pretrained`` exactly like a hub checkpoint, so it goes through the
same loading code as ``Salesforce/blip2-opt-2.7b``. Tests use it as a fixture; the demo trains it
on synthetic factory footage. The defaults are the settings that learn well from scratch on a CPU:
small random init for the vision tower, non-zero query tokens, cross-attention in every Q-Former
layer (with the library defaults, a model this small only learns the caption prior).
"""

import argparse
import os
import re

from tokenizers import models, normalizers, pre_tokenizers, processors, Tokenizer
import torch
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                          Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor, OPTConfig,
                          PreTrainedTokenizerFast, T5Config)

PAD, UNK, EOS, BOS, IMAGE = '<pad>', '<unk>', '</s>', '<s>', '<image>'

# Enough words for prompts like 'a photo of' and 'Question: is the conveyor empty? Answer:'.
BASE_WORDS = (
    'a an the of on in at with and or is are there what how many which where photo picture '
    'image question answer yes no empty full conveyor belt robot arm worker box boxes part parts '
    'one two three four red green blue yellow white black : ? , .'
).split()


def caption_words(texts):
    """Return the sorted set of lower-case words and punctuation marks used in ``texts``."""
    words = set()
    for text in texts:
        words.update(re.findall(r'\w+|[^\w\s]', text.lower()))
    return sorted(words)


def build_tokenizer(words, language_model):
    """Make a word-level fast tokenizer; OPT-style prepends ``</s>``, T5-style appends it."""
    vocab = {}
    for token in [PAD, UNK, EOS, BOS, IMAGE, *BASE_WORDS, *sorted(set(words))]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    eos_id = vocab[EOS]
    if language_model == 'opt':
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f'{EOS} $A', pair=f'{EOS} $A $B', special_tokens=[(EOS, eos_id)])
        bos = EOS
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f'$A {EOS}', pair=f'$A $B {EOS}', special_tokens=[(EOS, eos_id)])
        bos = None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, eos_token=EOS, bos_token=bos,
        padding_side='left' if language_model == 'opt' else 'right')
    # Blip2Processor registers '<image>' as a special token, as in the published checkpoints.
    return fast


def build_tiny_blip2(folder, language_model='opt', seed=0, words=None, image_size=64,
                     patch_size=8, hidden_size=96, num_layers=2, num_heads=4,
                     num_query_tokens=8, max_positions=128, image_init_std=None,
                     text_init_std=None, text_num_heads=None, words_only=False):
    """
    Build a randomly initialised BLIP-2, save it with its processor to ``folder``, return it.

    ``language_model`` is 'opt' (decoder-only, like blip2-opt-*) or 't5' (encoder-decoder, like
    blip2-flan-t5-*). ``words`` adds vocabulary, e.g. every word of a caption dataset.
    ``num_heads`` sets the attention heads of the vision encoder and Q-Former, and of the
    language model too unless ``text_num_heads`` is given.
    ``image_init_std`` (vision tower, Q-Former, query tokens, projection) and ``text_init_std``
    (language model) redraw the weight matrices wider than the training-friendly init: at that
    init every image gets the same caption, so a test comparing two implementations' captions
    would prove nothing (0.2 and 0.5 give captions that differ from image to image).
    ``words_only`` makes greedy decoding never pick a special token (see
    :func:`never_pick_special_tokens`): at the default init every caption is otherwise empty,
    and the caption node publishes no empty caption.
    """
    if language_model not in ('opt', 't5'):
        raise ValueError(f"language_model must be 'opt' or 't5', not {language_model!r}")
    text_num_heads = text_num_heads or num_heads
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words or [], language_model)
    image_processor = BlipImageProcessor(
        size={'height': image_size, 'width': image_size}, do_resize=True, do_rescale=True,
        do_normalize=True, do_convert_rgb=True)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=num_query_tokens)
    vocab_size = len(tokenizer)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    vision_config = Blip2VisionConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size,
        initializer_range=0.02)
    qformer_config = Blip2QFormerConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, cross_attention_frequency=1,
        encoder_hidden_size=hidden_size, max_position_embeddings=max_positions)
    if language_model == 'opt':
        text_config = OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, ffn_dim=4 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=text_num_heads,
            word_embed_proj_dim=hidden_size, max_position_embeddings=max_positions,
            pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id)
    else:
        text_config = T5Config(
            vocab_size=vocab_size, d_model=hidden_size, d_kv=hidden_size // text_num_heads,
            d_ff=4 * hidden_size, num_layers=num_layers, num_decoder_layers=num_layers,
            num_heads=text_num_heads, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
            pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
    config = Blip2Config(
        vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
        text_config=text_config.to_dict(), num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE))
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        # Zero query tokens make every query identical, so the Q-Former cannot tell them apart.
        model.query_tokens.normal_(0.0, 0.02)
    _widen_init(model, image_init_std, text_init_std)
    if words_only:
        never_pick_special_tokens(model, tokenizer)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def never_pick_special_tokens(model, tokenizer):
    """
    Zero the output-embedding rows of the tokenizer's special tokens (end and padding among them).

    Their scores are then 0 while the best word's is almost always above 0, so greedy decoding
    picks words and runs every caption to max_new_tokens: for benchmarks and tests that count
    captions.
    """
    with torch.no_grad():
        model.language_model.get_output_embeddings().weight[tokenizer.all_special_ids] = 0.0


def _widen_init(model, image_init_std, text_init_std):
    """Redraw the weight matrices of the image path and of the language model, where asked."""
    image_path = (model.vision_model, model.qformer, model.language_projection)
    parts = [(image_init_std, [model.query_tokens]
              + [weight for part in image_path for weight in part.parameters()]),
             (text_init_std, list(model.language_model.parameters()))]
    with torch.no_grad():
        for std, weights in parts:
            if std is None:
                continue
            # Biases and layer norms keep their init, which keeps activations in range.
            for weight in weights:
                if weight.dim() >= 2:
                    weight.normal_(0.0, std)


def main(argv=None):
    """Command line: build a tiny BLIP-2 checkpoint into a folder."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('folder')
    parser.add_argument('--language-model', choices=('opt', 't5'), default='opt')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--image-size', type=int, default=64)
    args = parser.parse_args(argv)
    build_tiny_blip2(args.folder, args.language_model, args.seed, image_size=args.image_size)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
