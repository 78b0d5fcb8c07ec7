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
The decode loop: greedy BLIP-2 decoding on static KV caches, compiled with torch.compile.

It gives the captions generate() gives, with everything on the device: no logits processors,
no per-token host synchronisation, and with torch_compile one compiled prefill and one compiled
decode step (CUDA graphs on GPUs), whose code is kept across reboots. Both note which
captions' scores turned NaN or inf. Also here: the static caches generate() reuses when the
loop cannot serve a call, and the same note for generate() (:class:`NonFiniteScores`).
"""

import logging
import os

from blip2_ros.checkpoint import one_line
import torch

LOGGER = logging.getLogger(__name__)

# Static KV caches kept, one per batch shape: enough for one per batch size a node with up to
# 8 cameras sees, at two caption lengths (blip2-opt-2.7b: about 21 MB per frame of batch).
MAX_STATIC_CACHES = 16
STATIC_CACHE_ROUNDING = 16
# torch.compile makes one version of a compiled function per batch shape (and per model kind
# and cache length); torch's default of 8 versions per function would leave a node with many
# cameras, or a process with several captioners, decoding uncompiled.
COMPILED_VERSIONS = 64
# The decode loop asks the GPU whether every caption has ended only every few tokens: asking
# waits for the GPU, and the CPU should stay ahead of it, queueing the next steps.
EOS_CHECK_INTERVAL = 4
# torch.compile's settings on GPUs: 'reduce-overhead' (CUDA graphs) for everything before the
# first token; for the decode step also kernels tuned by coordinate descent, which its one-row
# products need to read the weights near the GPU's bandwidth (OneRowLinear). Tuning costs
# compile time, so only the graph that runs once per token gets it.
CUDA_COMPILE_OPTIONS = {'triton.cudagraphs': True}
CUDA_STEP_COMPILE_OPTIONS = dict(CUDA_COMPILE_OPTIONS, coordinate_descent_tuning=True)
# Generation settings that change greedy decoding and that the decode loop does not implement,
# with their neutral values. A checkpoint whose generation config sets one decodes through
# generate(), which honours them.
LOGITS_PROCESSING_SETTINGS = {
    'repetition_penalty': 1.0, 'encoder_repetition_penalty': 1.0, 'no_repeat_ngram_size': 0,
    'encoder_no_repeat_ngram_size': 0, 'bad_words_ids': None, 'sequence_bias': None,
    'suppress_tokens': None, 'begin_suppress_tokens': None, 'forced_bos_token_id': None,
    'forced_eos_token_id': None, 'min_length': 0, 'min_new_tokens': None,
    'exponential_decay_length_penalty': None, 'renormalize_logits': False,
}


class OneRowLinear(torch.nn.Linear):
    """
    An nn.Linear whose one-row product, when compiled, is a reduction inductor writes and tunes.

    A batch-1 decode step multiplies one row by every weight matrix of the language model, so
    its speed is how fast those weights are read. For OPT-2.7b's layers, which have a bias,
    cuBLAS's kernels read them at 1.5 to 2.3 TB/s on an H200; this reduction, tuned by
    coordinate descent, at 2.3 to 3.3 TB/s (benchmarks/bench_gpu_matmul.py). torch makes
    such a reduction itself, with coordinate_descent_tuning on, of one-row matmuls without a
    bias, so only layers with a bias need this class. Eager calls, and calls with more rows,
    are nn.Linear's.
    """

    def forward(self, input):  # noqa: A002 - nn.Linear's argument name
        """Compute ``input @ weight.T + bias``."""
        if not torch.compiler.is_compiling() or input.shape[:-1].numel() != 1:
            return super().forward(input)
        # In float32, as torch's own decomposition computes it; inductor fuses the upcast,
        # the product and the sum into one kernel that reads the weight once.
        output = (input.unsqueeze(-2).float() * self.weight.float()).sum(-1)
        if self.bias is not None:
            output = output + self.bias.float()
        return output.to(input.dtype)


def use_one_row_reductions(module, enable=True):
    """Make each nn.Linear with a bias in ``module`` a OneRowLinear (enable False: undo it)."""
    old, new = (torch.nn.Linear, OneRowLinear) if enable else (OneRowLinear, torch.nn.Linear)
    for layer in module.modules():
        if type(layer) is old and layer.bias is not None:
            layer.__class__ = new


def compile_cache_folder():
    """
    Return the folder where torch.compile keeps compiled code for the captioner.

    The folder TORCHINDUCTOR_CACHE_DIR names, if it is not torch's default (torch sets the
    variable to its default itself when it imports its compiler); else
    ``$XDG_CACHE_HOME/blip2_ros/torch_compile``, by default under ``~/.cache``.
    """
    chosen = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # another torch: take any folder set as the user's choice
        torch_default = None
    if chosen and os.path.abspath(chosen) != torch_default:
        return chosen
    home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(home, 'blip2_ros', 'torch_compile')


def keep_compiled_code():
    """
    Make torch.compile keep what it compiles where a reboot leaves it; return that folder.

    torch keeps compiled code and kernel tunings in the system's temporary folder, which a
    reboot empties, so a robot's node would compile for minutes at every start. With the cache
    kept (``compile_cache_folder``), a later start reuses it. If the folder cannot be made (a
    read-only home), torch's default stays and None is returned. This sets
    TORCHINDUCTOR_CACHE_DIR for the whole process, as torch itself does.
    """
    folder = compile_cache_folder()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        LOGGER.info('compiled code is not kept across reboots: %s', one_line(error))
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        LOGGER.info('compiled code is not kept across reboots: cannot write to %s', folder)
        return None
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = folder
    return folder


def nan_or_inf_rows(scores):
    """
    Flag the rows of ``scores`` (batch, vocabulary) that hold NaN or +inf.

    One reduction, as cheap as the argmax that picks the token: max is NaN if any score is,
    and -inf, how processors and the end-token ban rule tokens out, is no fault.
    """
    highest = scores.amax(-1)
    return highest.isnan() | highest.isposinf()


class NonFiniteScores:
    """
    A logits processor for generate() that notes which rows' scores turned NaN or +inf.

    Such scores (a float16 overflow, a broken fine-tune or adapter) leave greedy search picking
    tokens from garbage. The scores pass through unchanged; ``rows`` holds one flag per row.
    """

    def __init__(self):
        """Start with no row flagged."""
        self.rows = None

    def __call__(self, input_ids, scores):
        """Flag the rows with NaN or +inf scores; pass the scores on as they are."""
        flagged = nan_or_inf_rows(scores)
        self.rows = flagged if self.rows is None else self.rows | flagged
        return scores


def _copies(*tensors):
    """Clone a CUDA graph's outputs (None stays): they live in its memory until its next replay."""
    return tuple(None if tensor is None else tensor.clone() for tensor in tensors)


class DecodeLoop:
    """
    Greedy decoding of one BLIP-2 model on reused static KV caches.

    ``enabled`` says whether the loop can decode for this model (its generation settings are
    all ones it implements); ``compiled`` whether it runs compiled. ``static_cache_for`` serves
    generate() too, for the calls the loop cannot take.
    """

    def __init__(self, model, device, static_cache, torch_compile):
        """Set up the loop for ``model``; with torch_compile, compile on the first call."""
        self.model, self.device = model, device
        self.static_cache = static_cache
        self.is_encoder_decoder = bool(model.config.text_config.is_encoder_decoder)
        self.num_query_tokens = model.config.num_query_tokens
        # One static cache per batch shape, reused: the compiled step and its CUDA graph are
        # tied to the cache's buffers, so a fresh cache for every call would re-record it.
        self.static_caches = {}
        self.non_finite_rows = None  # of the last decode
        settings = model.language_model.generation_config
        unsupported = [name for name, neutral in LOGITS_PROCESSING_SETTINGS.items()
                       if getattr(settings, name, neutral) not in (neutral, None)]
        self.enabled = static_cache and not unsupported
        if static_cache and unsupported:
            LOGGER.info('the checkpoint sets %s; decoding with generate()', unsupported[0])
        self._set_up_tokens(settings)
        # Everything before the first token, and the decode step: fixed shapes per batch size.
        self._compiled_functions = {}
        self.compiled = torch_compile and self.enabled
        self.compile_cache = self._compile() if self.compiled else None
        if torch_compile and not self.enabled:
            LOGGER.warning('torch_compile needs greedy decoding without logits processors; '
                           'decoding runs uncompiled')

    def _set_up_tokens(self, settings):
        """Keep the end, padding and decoder start tokens, and the score biases, on the device."""
        eos = settings.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        # Added to the scores: 0 everywhere, or -inf on the end tokens while they are ruled out.
        vocabulary = self.model.language_model.get_output_embeddings().weight.shape[0]
        self._no_eos_bias = torch.zeros(vocabulary, device=self.device)
        self._eos_ban = self._no_eos_bias.index_fill(0, self._eos_ids, float('-inf'))
        pad = settings.pad_token_id
        self._pad_id = eos[0] if pad is None and eos else int(pad or 0)
        self._decoder_start_id = settings.decoder_start_token_id
        if self._decoder_start_id is None:
            self._decoder_start_id = getattr(
                self.model.config.text_config, 'decoder_start_token_id', None)

    def _compile(self):
        """Compile the prefill and the decode step; return the folder compiled code is kept in."""
        folder = keep_compiled_code()
        limits = torch._dynamo.config
        limits.recompile_limit = max(limits.recompile_limit, COMPILED_VERSIONS)
        cuda = self.device.type == 'cuda'
        if cuda:
            use_one_row_reductions(self.model.language_model)
        # fullgraph: a graph break would silently split a graph and lose its CUDA graph.
        self._compiled_functions = {
            function.__name__: torch.compile(function, options=options if cuda else None,
                                             fullgraph=True)
            for function, options in ((self._prefill, CUDA_COMPILE_OPTIONS),
                                      (self._decode_step, CUDA_STEP_COMPILE_OPTIONS))}
        return folder

    def static_cache_for(self, batch_size, input_length, max_new_tokens):
        """Return a reset static KV cache for this batch shape, allocated on first use."""
        from transformers import EncoderDecoderCache, StaticCache

        # Rounding the decoder length up lets a slightly longer prompt or caption limit reuse
        # the same buffers, and the compiled step, instead of recompiling.
        if self.is_encoder_decoder:
            decoder_length = max_new_tokens + 1
            encoder_length = input_length
        else:
            decoder_length = input_length + max_new_tokens
            encoder_length = 0
        decoder_length = -(-decoder_length // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING
        key = (batch_size, decoder_length, encoder_length)
        cache = self.static_caches.pop(key, None)
        if cache is None:
            while len(self.static_caches) >= MAX_STATIC_CACHES:
                del self.static_caches[next(iter(self.static_caches))]
            text_config = self.model.config.text_config
            caches = [StaticCache(config=text_config, max_cache_len=decoder_length)]
            if self.is_encoder_decoder:
                # Cross-attention keys and values cover exactly the encoder's input.
                caches.append(StaticCache(config=text_config, max_cache_len=encoder_length))
            # Allocated now rather than by the first forward pass: tensors made inside a
            # compiled prefill would belong to its CUDA graph, and the next replay would
            # overwrite them.
            heads = (getattr(text_config, 'num_key_value_heads', None)
                     or text_config.num_attention_heads)
            head_size = (getattr(text_config, 'd_kv', None)
                         or getattr(text_config, 'head_dim', None)
                         or text_config.hidden_size // text_config.num_attention_heads)
            for part in caches:
                part.early_initialization(batch_size, heads, head_size,
                                          self.model.language_model.dtype, self.device)
            cache = EncoderDecoderCache(*caches) if self.is_encoder_decoder else caches[0]
        else:
            cache.reset()
        self.static_caches[key] = cache  # most recently used last
        return cache, decoder_length

    def _image_features(self, pixel_values):
        """Vision tower, Q-Former and projection: the image queries, as generate() makes them."""
        model = self.model
        image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                device=image_embeds.device)
        query_output = model.qformer(
            query_embeds=model.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
            return_dict=True).last_hidden_state
        return model.language_projection(query_output.to(image_embeds.dtype))

    def decode(self, pixel_values, input_ids, attention_mask, max_new_tokens, min_new_tokens):
        """
        Greedy decoding on the static cache; returns the new token ids, padded after EOS.

        Before ``min_new_tokens`` tokens, end-of-sequence tokens are ruled out, as generate()
        does for its ``min_new_tokens``.

        ``_prefill`` runs the image encoder and the prompt and picks the first token; every
        later token comes from ``_decode_step``, whose shapes never change. With torch_compile
        each is one compiled graph (a CUDA graph on GPUs), replayed per call and per token.
        Tokens stay on the device, and the host asks whether all captions have ended only
        every EOS_CHECK_INTERVAL tokens. Afterwards ``non_finite_rows`` says, per caption,
        whether its scores turned NaN or inf on the way (see :class:`NonFiniteScores`).
        """
        batch_size, prompt_length = input_ids.shape
        cache, cache_length = self.static_cache_for(batch_size, prompt_length, max_new_tokens)
        eos_ban, eos_bias = self._eos_ban, self._no_eos_bias
        cuda_graphs = bool(self._compiled_functions) and self.device.type == 'cuda'
        tokens, unfinished, non_finite, context, positions = self._run(
            '_prefill', cache, pixel_values, input_ids, attention_mask, cache_length,
            eos_ban if min_new_tokens > 0 else eos_bias)
        if cuda_graphs:
            tokens, unfinished, non_finite, positions = _copies(
                tokens, unfinished, non_finite, positions)
            context = _copies(*context)
        output = torch.full((batch_size, max_new_tokens), self._pad_id, device=self.device)
        output[:, 0] = tokens
        check_interval = EOS_CHECK_INTERVAL if self.device.type == 'cuda' else 1
        length = 1
        while length < max_new_tokens:
            if (length >= min_new_tokens and (length - 1) % check_interval == 0
                    and not bool(unfinished.any())):
                break
            tokens, unfinished, non_finite, positions = self._run(
                '_decode_step', cache, context, tokens, unfinished, non_finite, positions,
                eos_ban if length < min_new_tokens else eos_bias)
            output[:, length] = tokens
            if cuda_graphs:
                tokens, unfinished, non_finite, positions = _copies(
                    tokens, unfinished, non_finite, positions)
            length += 1
        self.non_finite_rows = non_finite
        return output[:, :length]

    def _run(self, name, *args):
        """Run a method compiled if it is; if it cannot be compiled here, say why and go eager."""
        compiled = self._compiled_functions.get(name)
        if compiled is None:
            return getattr(self, name)(*args)
        if self.device.type == 'cuda':
            # A new replay: outputs of earlier replays may be overwritten from here on.
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: B902 - compilers fail in many ways, all handled alike
            # Compiling fails before the code runs, so the cache is as it was.
            LOGGER.error('compiling failed, decoding uncompiled from now on: %s',
                         one_line(error))
            self._compiled_functions = {}
            self.compiled = False
            return getattr(self, name)(*args)

    def _prefill(self, cache, pixel_values, input_ids, attention_mask, cache_length, eos_bias):
        """
        Image queries, prompt and the first new token; fills the cache for the decode steps.

        Returns the first tokens, which captions have not ended yet, which captions' scores
        are not finite, what every decode step reads besides the cache (the attention mask; for
        T5 the encoder's output and mask) and the last positions (None for T5).
        """
        language_model = self.model.language_model
        batch_size, prompt_length = input_ids.shape
        # The image queries take the place of the query-token placeholders, which
        # _encode_prompts puts first in every row.
        text_embeds = self.model.get_input_embeddings()(input_ids[:, self.num_query_tokens:])
        image_features = self._image_features(pixel_values).to(text_embeds.dtype)
        embeds = torch.cat([image_features, text_embeds], dim=1)
        if self.is_encoder_decoder:
            encoder_states = language_model.get_encoder()(
                inputs_embeds=embeds, attention_mask=attention_mask,
                return_dict=True).last_hidden_state
            start = torch.full((batch_size, 1), self._decoder_start_id, device=self.device)
            logits = language_model(
                encoder_outputs=(encoder_states,), attention_mask=attention_mask,
                decoder_input_ids=start, past_key_values=cache, use_cache=True).logits
            context, positions = (encoder_states, attention_mask), None
        else:
            # The mask covers the whole cache: slots not written yet are hidden by causality.
            mask = torch.ones((batch_size, cache_length), dtype=attention_mask.dtype,
                              device=self.device)
            mask[:, :prompt_length] = attention_mask
            # Left padding: each row counts its positions from its own first real token.
            positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
            # Only the last position's scores pick a token: the output embedding, the
            # largest matrix, multiplies one row per caption instead of the whole prompt.
            logits = language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            context, positions = (mask,), positions[:, -1:]
        tokens = (logits[:, -1] + eos_bias).argmax(-1)
        unfinished = ~torch.isin(tokens, self._eos_ids)
        return tokens, unfinished, nan_or_inf_rows(logits[:, -1]), context, positions

    def _decode_step(self, cache, context, tokens, unfinished, non_finite, positions, eos_bias):
        """
        Feed each caption's last token, pick the next one; finished captions get padding.

        ``non_finite`` gains the unfinished captions whose scores are not finite at this step.
        """
        language_model = self.model.language_model
        if self.is_encoder_decoder:
            encoder_states, encoder_mask = context
            logits = language_model(
                encoder_outputs=(encoder_states,), attention_mask=encoder_mask,
                decoder_input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits
        else:
            positions = positions + 1
            logits = language_model(
                input_ids=tokens[:, None], attention_mask=context[0], position_ids=positions,
                past_key_values=cache, use_cache=True).logits
        scores = logits[:, -1]
        non_finite = non_finite | (unfinished & nan_or_inf_rows(scores))
        tokens = torch.where(unfinished, (scores + eos_bias).argmax(-1), self._pad_id)
        unfinished = unfinished & ~torch.isin(tokens, self._eos_ids)
        return tokens, unfinished, non_finite, positions
