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
Fine-tune BLIP-2 on a COCO caption dataset folder.

    python -m training.train --model Salesforce/blip2-opt-2.7b --data DIR --output_dir OUT
        --method lora|qformer|full [any transformers TrainingArguments]
    python -m training.train config.yaml

Methods: ``qformer`` trains the Q-Former, the query tokens and the language projection (the
BLIP-2 recipe; vision encoder and language model frozen); ``lora`` adds LoRA adapters to the
language model's attention (optionally also trains the Q-Former); ``full`` trains everything.
The output folder loads in :class:`blip2_ros.captioner.Blip2Captioner`: ``model=OUT`` for
qformer/full, ``model=BASE, adapter=OUT`` for lora. Runs under ``torchrun`` / ``accelerate
launch`` through the Trainer's own distributed support. Which checkpoint a run resumes and
which ones it deletes: :mod:`training.checkpoints`.
"""

from dataclasses import dataclass, field
import importlib.util
import json
import logging
import os
from pathlib import Path
import re
import sys
import warnings

from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
from blip2_ros.checkpoint import (blip2_model_class, ModelLoadError, one_line,
                                  read_blip2_config, TRAINING_INFO_FILE)
import torch
from training.checkpoints import (CheckpointError, CheckpointMarkerCallback,
                                  choose_resume_checkpoint, GracefulStopCallback,
                                  is_distributed, load_finished_checkpoint)
from training.coco import DatasetError, usual_mode, write_text_atomic
from training.data import (CaptionCollator, CaptionPairs, load_split, split_path,
                           unsplit_warning)
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import IntervalStrategy, set_seed
import yaml

LOGGER = logging.getLogger('training.train')

METHODS = ('lora', 'qformer', 'full')
# What each method trains, by parameter-name prefix of Blip2ForConditionalGeneration.
QFORMER_PREFIXES = ('qformer.', 'query_tokens', 'language_projection.')
# LoRA goes on the attention projections of the language model, named per architecture.
LORA_TARGETS = {'opt': ('q_proj', 'v_proj'), 't5': ('q', 'v')}
SUMMARY_METRICS = ('eval_loss', 'eval_exact_match', 'eval_Bleu_4', 'eval_CIDEr')
WEIGHT_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16,
                 'float16': torch.float16}


class TrainingError(RuntimeError):
    """A problem the user can fix (arguments, dataset, checkpoint); the message is one line."""


@dataclass
class ModelArguments:
    """Which checkpoint to start from and which parts of it to train."""

    model: str = field(
        default='Salesforce/blip2-opt-2.7b',
        metadata={'help': 'BLIP-2 checkpoint to fine-tune: a hub id or a local folder.'})
    method: str = field(
        default='qformer',
        metadata={'help': 'What to train: qformer (Q-Former, query tokens, projection), lora '
                          '(LoRA on the language model attention), full (everything).',
                  'choices': METHODS})
    lora_r: int = field(default=16, metadata={'help': 'LoRA rank.'})
    lora_alpha: int = field(default=32, metadata={'help': 'LoRA scaling numerator (alpha / r).'})
    lora_dropout: float = field(default=0.05, metadata={'help': 'Dropout on the LoRA input.'})
    lora_target_modules: str = field(
        default='',
        metadata={'help': 'Comma-separated attention projections of the language model to adapt '
                          '(default: q_proj,v_proj for OPT, q,v for T5; OPT also has k_proj, '
                          'out_proj; T5 also has k, o).'})
    lora_qformer: bool = field(
        default=False,
        metadata={'help': 'With lora: also train the Q-Former and the language projection '
                          '(saved inside the adapter).'})
    merge_lora: bool = field(
        default=False,
        metadata={'help': 'With lora: also write a merged full model to OUTPUT_DIR/merged.'})
    load_in_8bit: bool = field(
        default=False,
        metadata={'help': 'With lora: 8-bit language model weights (needs bitsandbytes and a '
                          'CUDA GPU).'})
    load_in_4bit: bool = field(
        default=False,
        metadata={'help': 'With lora: 4-bit NF4 language model weights, QLoRA (needs '
                          'bitsandbytes and a CUDA GPU).'})
    weights_dtype: str = field(
        default='auto',
        metadata={'help': 'dtype of the frozen weights: auto (bfloat16 on a GPU for lora and '
                          'qformer, else float32), float32, bfloat16, float16. Trained weights '
                          'stay float32; use --bf16/--fp16 for mixed precision.'})
    allow_pickle: bool = field(
        default=False,
        metadata={'help': 'Allow loading .bin (pickle) weights; only for checkpoints you trust.'})
    trust_remote_code: bool = field(
        default=False,
        metadata={'help': "Run the code the base's config.json names (auto_map); its model "
                          'class must build on Blip2ForConditionalGeneration. Only for '
                          'checkpoints you trust.'})

    def __post_init__(self):
        """Reject unusable combinations with a message that says what to change."""
        if self.method not in METHODS:
            raise TrainingError(f'--method {self.method} is unknown: use lora, qformer or full')
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise TrainingError('--lora_r and --lora_alpha must be positive integers')
        if not 0.0 <= self.lora_dropout < 1.0:
            raise TrainingError('--lora_dropout must be in [0, 1)')
        if self.weights_dtype != 'auto' and self.weights_dtype not in WEIGHT_DTYPES:
            raise TrainingError(f'--weights_dtype {self.weights_dtype} is unknown: use auto, '
                                f'{", ".join(WEIGHT_DTYPES)}')
        if self.method == 'full' and self.weights_dtype in ('bfloat16', 'float16'):
            raise TrainingError('--method full keeps float32 weights; for less memory use --bf16 '
                                '(mixed precision), or --method lora / qformer')
        lora_only = [name for name in ('lora_qformer', 'merge_lora', 'load_in_8bit',
                                       'load_in_4bit') if getattr(self, name)]
        if lora_only and self.method != 'lora':
            raise TrainingError(f'--{lora_only[0]} only applies to --method lora')
        if self.load_in_8bit and self.load_in_4bit:
            raise TrainingError('choose one of --load_in_8bit and --load_in_4bit')
        if self.load_in_8bit or self.load_in_4bit:
            check_quantization_support()

    @property
    def quantized(self):
        """Return True when the base language model is loaded in 8 or 4 bits."""
        return self.load_in_8bit or self.load_in_4bit


@dataclass
class DataArguments:
    """The dataset folder, its splits and how captions are laid out."""

    data: str = field(
        default='',
        metadata={'help': 'Dataset folder from training.bag_to_coco + training.split (images/, '
                          'annotations.json, train_split.jsonl, val_split.jsonl).'})
    train_split: str = field(
        default='train', metadata={'help': "Split to train on ('all': every image)."})
    eval_split: str = field(
        default='val',
        metadata={'help': "Split for eval loss and caption metrics ('' for none)."})
    prompt: str = field(
        default='',
        metadata={'help': 'Text before each caption, e.g. "a photo of". Saved with the model '
                          'and its checkpoints; the node, caption_images and evaluate use it.'})
    max_caption_tokens: int = field(
        default=40, metadata={'help': 'Captions longer than this many tokens are cut.'})
    cache_images: bool = field(
        default=False,
        metadata={'help': 'Keep decoded images in memory (small datasets, many epochs).'})
    caption_eval_images: int = field(
        default=16,
        metadata={'help': 'Validation images captioned at each evaluation for BLEU/CIDEr/exact '
                          'match in TensorBoard (0: eval loss only).'})
    logged_images: int = field(
        default=4,
        metadata={'help': 'Of those, how many go to TensorBoard as pictures with predicted and '
                          'reference captions.'})
    caption_max_new_tokens: int = field(
        default=30, metadata={'help': 'Longest caption generated at evaluation.'})

    def __post_init__(self):
        """Reject a missing dataset folder and negative counts."""
        if not self.data:
            raise TrainingError('--data is required: a dataset folder made by '
                                'training.bag_to_coco and training.split')
        if not os.path.isdir(self.data):
            raise TrainingError(f'--data {self.data} is not a folder')
        if self.max_caption_tokens < 1 or self.caption_max_new_tokens < 1:
            raise TrainingError('--max_caption_tokens and --caption_max_new_tokens must be >= 1')
        if self.caption_eval_images < 0 or self.logged_images < 0:
            raise TrainingError('--caption_eval_images and --logged_images must be >= 0')


@dataclass
class CaptionTrainingArguments(TrainingArguments):
    """transformers TrainingArguments with defaults for captioning and resume/stop controls."""

    output_dir: str = field(
        default=None, metadata={'help': 'Folder for checkpoints, logs and the trained model.'})
    resume: bool = field(
        default=False,
        metadata={'help': 'Continue from the newest complete checkpoint in --output_dir '
                          '(incomplete ones are skipped).'})
    stop_after_steps: int = field(
        default=0,
        metadata={'help': 'Save a checkpoint and stop after this many optimizer steps in this '
                          'run (0: no limit); the schedule still follows max_steps / epochs, '
                          'so --resume continues it. A budget that reaches the last step '
                          'finishes the run and saves the model.'})
    cpu_threads: int = field(
        default=0,
        metadata={'help': 'torch CPU threads (0: torch default). 1 is several times faster for '
                          'tiny models on a busy CPU, where spinning threads wait on each other.'})
    learning_rate: float = field(default=1e-4, metadata={'help': 'Peak AdamW learning rate.'})
    report_to: None | str | list[str] = field(
        default='tensorboard',
        metadata={'help': 'Where to log: tensorboard (OUTPUT_DIR/runs), none, or other '
                          'integrations.'})
    logging_steps: float = field(default=10, metadata={'help': 'Log every N steps.'})
    logging_first_step: bool = field(default=True, metadata={'help': 'Log the first step.'})
    save_steps: float = field(default=200, metadata={'help': 'Checkpoint every N steps.'})
    save_total_limit: int | None = field(
        default=3, metadata={'help': 'Keep at most this many checkpoints.'})
    eval_strategy: IntervalStrategy | str = field(
        default='steps',
        metadata={'help': 'When to evaluate: steps, epoch or no (off without an eval split).'})
    eval_steps: float | None = field(
        default=None, metadata={'help': 'Evaluate every N steps (default: save_steps).'})
    remove_unused_columns: bool = field(
        default=False, metadata={'help': 'Keep False: the collator needs the raw columns.'})
    prediction_loss_only: bool = field(
        default=True, metadata={'help': 'Evaluation keeps only the loss, not the logits.'})

    def __post_init__(self):
        """Fill defaults that depend on the machine, then run the usual checks."""
        if not self.output_dir:
            raise TrainingError('--output_dir is required: where checkpoints and the model go')
        if self.stop_after_steps < 0 or self.cpu_threads < 0:
            raise TrainingError('--stop_after_steps and --cpu_threads must be >= 0')
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        if not torch.cuda.is_available():
            if self.fp16:
                raise TrainingError('--fp16 needs a CUDA GPU, and torch sees none; on a CPU '
                                    'train in float32 (the default), or --bf16')
            if self.bf16:
                LOGGER.warning('--bf16 on a CPU: bf16 autocast is slower than float32 unless '
                               'the CPU has bf16 instructions (AMX, AVX512-BF16); drop it if '
                               'steps are slow')
            # bf16 autocast and torchrun both need the Trainer told it runs on the CPU (gloo).
            self.use_cpu = True
            if self.ddp_backend is None and int(os.environ.get('WORLD_SIZE', '1')) > 1:
                self.ddp_backend = 'gloo'
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen inputs (lora, qformer).
            self.gradient_checkpointing_kwargs = {'use_reentrant': False}
        if self.ddp_find_unused_parameters is None:
            # The Q-Former's text-only feed-forward layers get no gradient when captioning.
            self.ddp_find_unused_parameters = True
        try:
            super().__post_init__()
        except ValueError as error:
            raise TrainingError(' '.join(str(error).split())) from error


def check_quantization_support():
    """Raise TrainingError unless bitsandbytes and a CUDA GPU are both there."""
    if not torch.cuda.is_available():
        raise TrainingError('8-bit / 4-bit weights need a CUDA GPU, and torch sees none; '
                            'drop --load_in_8bit / --load_in_4bit to train in full precision')
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise TrainingError('8-bit / 4-bit weights need bitsandbytes: pip install bitsandbytes'
                            ) from error


def parse_arguments(argv=None):
    """
    Parse command-line flags into the three dataclasses.

    A .yaml/.json config file as the first argument gives the settings; flags after it
    override them (``config.yaml --resume``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, CaptionTrainingArguments))
    if argv and argv[0].endswith(('.yaml', '.yml', '.json')):
        name, argv = argv[0], argv[1:]
        try:
            with open(name, encoding='utf-8') as stream:
                config = json.load(stream) if name.endswith('.json') else yaml.safe_load(stream)
        except FileNotFoundError:
            raise TrainingError(f'config file {name} does not exist') from None
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise TrainingError(f'cannot read config file {name}: {one_line(error)}') from None
        if not isinstance(config, dict):
            raise TrainingError(f'config file {name} must hold settings as "name: value" lines')
        settings = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - settings)
        if unknown:
            raise TrainingError(f'config file {name}: unknown setting {unknown[0]!r}; the '
                                'settings are the flags without their dashes (--help)')
        # Values from the file count as defaults, so flags after it win.
        parser.set_defaults(**config)
    return parser.parse_args_into_dataclasses(args=argv)


def check_datasets_package():
    """Refuse to start where a plain folder named 'datasets' would pass for the HF package."""
    spec = importlib.util.find_spec('datasets')
    if spec is not None and spec.origin is None and spec.submodule_search_locations:
        # Without the Hugging Face package installed, Python imports the folder as a namespace
        # package, transformers believes the library is there, and the Trainer fails mid-way.
        folder = list(spec.submodule_search_locations)[0]
        raise TrainingError(f"the folder {folder} passes for the Hugging Face 'datasets' "
                            'package here: run from another directory or rename that folder')


# ---------------------------------------------------------------------------------------------
# Model


def resolve_weights_dtype(model_args):
    """Pick the dtype of the frozen weights (trained weights are always float32)."""
    if model_args.weights_dtype != 'auto':
        return WEIGHT_DTYPES[model_args.weights_dtype]
    if (torch.cuda.is_available() and model_args.method in ('lora', 'qformer')
            and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def load_model(model_args, training_args):
    """Load the BLIP-2 checkpoint and its processor; raise TrainingError on failure."""
    from transformers import Blip2Processor

    where = f"BLIP-2 model '{model_args.model}'"
    try:
        # The node's checks: BLIP-2, and code of its own only with --trust_remote_code.
        config = read_blip2_config(model_args.model, False, where, model_args.trust_remote_code)
        model_class = blip2_model_class(model_args.model, config, False, where)
    except ModelLoadError as error:
        raise TrainingError(str(error)) from error
    dtype = resolve_weights_dtype(model_args)
    load_args = {'dtype': dtype, 'use_safetensors': not model_args.allow_pickle,
                 'trust_remote_code': False}
    if model_args.quantized:
        from transformers import BitsAndBytesConfig
        # Only the language model is quantized; the vision tower and Q-Former stay as loaded.
        load_args['quantization_config'] = BitsAndBytesConfig(
            load_in_8bit=model_args.load_in_8bit, load_in_4bit=model_args.load_in_4bit,
            bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=['vision_model', 'qformer', 'language_projection', 'lm_head'])
        load_args['device_map'] = {'': training_args.local_process_index}
    try:
        processor = Blip2Processor.from_pretrained(model_args.model)
        model = model_class.from_pretrained(model_args.model, **load_args)
    except (OSError, ValueError, RuntimeError) as error:
        hint = ''
        if not model_args.allow_pickle and 'safetensors' in str(error).lower():
            hint = (' (it has no safetensors weights: add --allow_pickle true to load its '
                    'pickle .bin weights if you trust its source, or re-save it as safetensors)')
        raise TrainingError(f'cannot load {where}: {one_line(error)}{hint}') from error
    if model.config.text_config.is_encoder_decoder:
        # T5 averages its loss itself; without this the Trainer would skip dividing it by the
        # gradient accumulation steps.
        model.accepts_loss_kwargs = False
    return model, processor


def lora_target_regex(model, model_args):
    """Return a regex naming the language model's attention projections to adapt."""
    architecture = model.config.text_config.model_type
    if model_args.lora_target_modules:
        names = [name.strip() for name in model_args.lora_target_modules.split(',')
                 if name.strip()]
    elif architecture in LORA_TARGETS:
        names = LORA_TARGETS[architecture]
    else:
        raise TrainingError(f"no default LoRA targets for a '{architecture}' language model: "
                            'name them with --lora_target_modules')
    # Anchored under language_model so vision and Q-Former layers are never adapted.
    return r'language_model\..*\.(' + '|'.join(re.escape(name) for name in names) + r')'


def apply_method(model, model_args):
    """Freeze and wrap ``model`` for the chosen method; return the model to train."""
    if model_args.method == 'full':
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if model_args.method == 'qformer':
        for name, parameter in model.named_parameters():
            trainable = name.startswith(QFORMER_PREFIXES)
            parameter.requires_grad_(trainable)
            if trainable and parameter.dtype != torch.float32:
                # Optimiser updates are lost in 16-bit weights; keep what is trained in float32.
                parameter.data = parameter.data.float()
        return model
    from peft import get_peft_model, LoraConfig, prepare_model_for_kbit_training

    if model_args.quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=False)
    target = lora_target_regex(model, model_args)
    matched = [name for name, _ in model.named_modules() if re.fullmatch(target, name)]
    if not matched:
        raise TrainingError(f'--lora_target_modules matched no module of the language model '
                            f'({target}); check the names in the model')
    config = LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout, target_modules=target, bias='none',
        modules_to_save=['qformer', 'language_projection'] if model_args.lora_qformer else None)
    with warnings.catch_warnings():
        # peft reads the deprecated is_gradient_checkpointing (transformers 5): not ours to fix.
        warnings.filterwarnings('ignore', message='`is_gradient_checkpointing` is deprecated',
                                category=FutureWarning)
        return get_peft_model(model, config)


def match_mixed_precision(model_args, training_args):
    """Turn on autocast when frozen weights are 16-bit, so float32 trained layers can meet them."""
    dtype = resolve_weights_dtype(model_args)
    if dtype == torch.float32 or training_args.bf16 or training_args.fp16:
        return
    LOGGER.info('frozen weights are %s: turning on %s mixed precision', dtype,
                'bf16' if dtype == torch.bfloat16 else 'fp16')
    if dtype == torch.bfloat16:
        training_args.bf16 = True
        training_args.mixed_precision = 'bf16'
    else:
        training_args.fp16 = True
        training_args.mixed_precision = 'fp16'


def count_parameters(model):
    """Return ``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def unwrap_blip2(model):
    """Return the Blip2ForConditionalGeneration inside a DDP and/or peft wrapper."""
    model = getattr(model, 'module', model)
    if hasattr(model, 'get_base_model'):
        model = model.get_base_model()
    return model


# ---------------------------------------------------------------------------------------------
# Trainer with caption metrics


class CaptionTrainer(Trainer):
    """A Trainer whose evaluation also captions a few validation images and scores them."""

    def __init__(self, *args, caption_eval=None, **kwargs):
        """``caption_eval``: dict with dataset, prompt, images, logged_images, max_new_tokens."""
        super().__init__(*args, **kwargs)
        self.caption_eval = caption_eval

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix='eval'):
        """Compute the eval loss, then caption metrics, and log both."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.caption_eval is None or eval_dataset is not None:
            return metrics
        caption_metrics = [None]
        if self.is_world_process_zero():
            caption_metrics[0] = self._caption_metrics(metric_key_prefix)
        if is_distributed():
            # Every rank returns the same metrics, so best-model tracking agrees everywhere.
            torch.distributed.broadcast_object_list(caption_metrics, src=0)
        metrics.update(caption_metrics[0])
        self.log(caption_metrics[0])
        return metrics

    def _caption_metrics(self, prefix):
        from training.evaluate import score_captions

        settings = self.caption_eval
        dataset = settings['dataset']
        count = min(settings['images'], len(dataset.records))
        frames = [dataset.image(index) for index in range(count)]
        model = unwrap_blip2(self.model)
        was_training = model.training
        tokenizer = self.processing_class.tokenizer
        padding_side = tokenizer.padding_side  # the captioner sets its own; checkpoints keep ours
        # The node's own captioner (its preprocessing, prompt layout and decode loop) on the
        # model in training: these captions are what the robot would say at this step.
        captioner = Blip2Captioner.from_model(model, self.processing_class, CaptionerConfig(
            model=str(model.name_or_path or ''), prompt=settings['prompt'],
            max_new_tokens=settings['max_new_tokens']))
        predictions = []
        try:
            with self.accelerator.autocast():
                for start in range(0, count, 16):
                    predictions += captioner.caption(frames[start:start + 16])
        finally:
            model.train(was_training)
            tokenizer.padding_side = padding_side
        references = {index: list(dataset.records[index].captions) for index in range(count)}
        result = score_captions(references, dict(enumerate(predictions)),
                                metrics=('Bleu', 'ROUGE_L', 'CIDEr', 'exact_match'),
                                tokenizer='simple')
        self._log_examples(frames, predictions, references, settings['logged_images'])
        return {f'{prefix}_{name}': value for name, value in result.scores.items()}

    def _log_examples(self, frames, predictions, references, count):
        writer = next((callback.tb_writer for callback in self.callback_handler.callbacks
                       if isinstance(callback, TensorBoardCallback)
                       and callback.tb_writer is not None), None)
        if writer is None or count == 0:
            return
        step = self.state.global_step
        rows = ['| image | predicted | reference |', '|---|---|---|']
        for index in range(min(count, len(frames))):
            writer.add_image(f'val_images/{index}', frames[index], step, dataformats='HWC')
            rows.append(f'| {index} | {predictions[index]} | {references[index][0]} |')
        writer.add_text('val_captions', '\n'.join(rows), step)
        writer.flush()


# ---------------------------------------------------------------------------------------------
# Main


def validate_data(folder):
    """Run training.validate on the dataset folder; raise DatasetError if anything is wrong."""
    from training.validate import check_dataset

    check_dataset(folder, require_captions=True)


def count_shared_images(train_records, eval_records):
    """Return how many of ``eval_records``' images are also trained on (have captions there)."""
    trained = {record.image_id for record in train_records if record.captions}
    return sum(record.image_id in trained for record in eval_records)


def logged_eval_metrics(state):
    """Return the eval metrics the Trainer logged at the final step, if it evaluated there."""
    metrics = {}
    for entry in state.log_history:
        if entry.get('step') == state.global_step and any(key.startswith('eval_')
                                                          for key in entry):
            metrics.update({key: value for key, value in entry.items()
                            if key.startswith('eval_')})
    return metrics


def training_info(model_args, data_args, model):
    """Return the prompt and how the model was trained, as saved next to its weights."""
    return {
        'prompt': data_args.prompt,
        'method': model_args.method,
        'base_model': model_args.model,
        'language_model': model.config.text_config.model_type,
        'max_caption_tokens': data_args.max_caption_tokens,
    }


def write_training_info(folder, info):
    """Write ``info`` (see :func:`training_info`) to ``folder``/blip2_ros_training.json."""
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(os.path.join(folder, TRAINING_INFO_FILE),
                      json.dumps(info, indent=1, sort_keys=True) + '\n')


def share_weight_files(folder):
    """
    Give the weight files in ``folder`` the mode other saved files get (0644 under umask 022).

    safetensors 0.8 writes through a temporary file that is always 0600 (safetensors issue
    782), so a model copied to a robot whose node runs as another user would not load.
    """
    mode = usual_mode()
    for path in Path(folder).glob('*.safetensors'):
        os.chmod(path, mode)


def merge_lora(trainer, model_args, info, processor, output_dir):
    """Write base + adapter merged into one full model under OUTPUT_DIR/merged."""
    from peft import PeftModel

    merged_dir = os.path.join(output_dir, 'merged')
    if model_args.quantized:
        # Merging into 8/4-bit weights rounds the update away: reload the base unquantized,
        # with the class it was trained with (its own, if trusted).
        base = type(unwrap_blip2(trainer.model)).from_pretrained(
            model_args.model, dtype=torch.bfloat16,
            use_safetensors=not model_args.allow_pickle)
        model = PeftModel.from_pretrained(base, output_dir).merge_and_unload()
    else:
        model = trainer.model.merge_and_unload()
    # Weights last, as in OUTPUT_DIR: a cut-off merge never loads without its prompt.
    processor.save_pretrained(merged_dir)
    write_training_info(merged_dir, info)
    model.save_pretrained(merged_dir)
    share_weight_files(merged_dir)
    return merged_dir


def add_checkpoint_files(folder, info):
    """Write the training info into a checkpoint folder and let other users read its weights."""
    # training.evaluate or the node pointed at a checkpoint must caption with the training
    # prompt, and read its weights as another user. Written before the checkpoint's marker,
    # so the marker vouches for them too.
    write_training_info(folder, info)
    share_weight_files(folder)


@dataclass
class TrainingData:
    """The pairs to train on, those to evaluate on (None: no evaluation), and their overlap."""

    train_pairs: CaptionPairs
    eval_pairs: CaptionPairs | None
    trained_eval_images: int = 0  # evaluation images that are trained on too


def load_eval_pairs(data_args):
    """Return the captioned pairs of the eval split, or None when it has none."""
    if not data_args.eval_split or not os.path.isfile(split_path(data_args.data,
                                                                 data_args.eval_split)):
        return None
    eval_records = [record for record in load_split(data_args.data, data_args.eval_split)
                    if record.captions]
    if not eval_records:
        return None
    return CaptionPairs(data_args.data, eval_records, data_args.cache_images)


def load_data(data_args, training_args):
    """Validate the dataset and read its splits; evaluation is turned off without eval pairs."""
    validate_data(data_args.data)
    unsplit = unsplit_warning(data_args.data, (data_args.train_split, data_args.eval_split))
    if unsplit:
        LOGGER.warning(unsplit)
    train_records = load_split(data_args.data, data_args.train_split)
    if not any(record.captions for record in train_records):
        raise TrainingError(f"split '{data_args.train_split}' of {data_args.data} has no "
                            'captioned image to train on')
    data = TrainingData(CaptionPairs(data_args.data, train_records, data_args.cache_images),
                        load_eval_pairs(data_args))
    if data.eval_pairs is None and training_args.eval_strategy != IntervalStrategy.NO:
        if data_args.eval_split:  # --eval_split '' asked for no evaluation: nothing to say
            LOGGER.warning("no captioned images in eval split '%s': evaluation is off",
                           data_args.eval_split)
        training_args.eval_strategy = IntervalStrategy.NO
    if data.eval_pairs is not None and training_args.eval_strategy != IntervalStrategy.NO:
        # Warned, not refused: a last run on every image once the settings are chosen is
        # common, and its eval numbers still show the fit; they must not pass for held-out ones.
        data.trained_eval_images = count_shared_images(train_records, data.eval_pairs.records)
        if data.trained_eval_images:
            LOGGER.warning("%d of %d eval images of split '%s' are also in training split '%s': "
                           'eval loss and caption metrics are not held-out scores (give a '
                           "held-out --eval_split, or --eval_split '' for none)",
                           data.trained_eval_images, len(data.eval_pairs.records),
                           data_args.eval_split, data_args.train_split)
    LOGGER.info('%d training pairs from %d images, %d eval pairs', len(data.train_pairs),
                len(train_records), len(data.eval_pairs) if data.eval_pairs else 0)
    return data


def prepare_model(model_args, training_args):
    """Load the model and its processor, and leave trainable what the method trains."""
    model, processor = load_model(model_args, training_args)
    model = apply_method(model, model_args)
    match_mixed_precision(model_args, training_args)
    trainable, total = count_parameters(model)
    LOGGER.info('method %s: trainable params: %d || all params: %d || trainable%%: %.4f',
                model_args.method, trainable, total, 100.0 * trainable / total)
    return model, processor


def build_trainer(model, processor, data, info, data_args, training_args):
    """Return the CaptionTrainer, with its collator and callbacks, and its stop callback."""
    blip2 = unwrap_blip2(model)
    collator = CaptionCollator(
        processor, blip2.config.image_token_id, blip2.config.num_query_tokens,
        blip2.config.text_config.is_encoder_decoder, data_args.prompt,
        data_args.max_caption_tokens)
    caption_eval = None
    if data.eval_pairs is not None and data_args.caption_eval_images:
        caption_eval = {'dataset': data.eval_pairs, 'prompt': data_args.prompt,
                        'images': data_args.caption_eval_images,
                        'logged_images': data_args.logged_images,
                        'max_new_tokens': data_args.caption_max_new_tokens}
    stopper = GracefulStopCallback(training_args.stop_after_steps)
    # Checkpoints are rotated once the new one is complete, by the marker callback.
    marker = CheckpointMarkerCallback(lambda folder: add_checkpoint_files(folder, info),
                                      keep_checkpoints=training_args.save_total_limit)
    training_args.save_total_limit = None
    trainer = CaptionTrainer(
        model=model, args=training_args, train_dataset=data.train_pairs,
        eval_dataset=data.eval_pairs, data_collator=collator, processing_class=processor,
        callbacks=[marker, stopper], caption_eval=caption_eval)
    return trainer, stopper


def report_stop(trainer, stopper):
    """Say where a stopped run left its checkpoint; return the exit status."""
    if trainer.is_world_process_zero():
        checkpoint = os.path.join(trainer.args.output_dir,
                                  f'checkpoint-{trainer.state.global_step}')
        print(f'stopped by {stopper.reason} at step {trainer.state.global_step}; '
              f'checkpoint {checkpoint}; continue with the same command plus --resume')
    return 128 + stopper.signal_number if stopper.signal_number else 0


def final_eval_metrics(trainer, data):
    """Return the eval metrics of the final weights ({} without evaluation)."""
    if data.eval_pairs is None or trainer.args.eval_strategy == IntervalStrategy.NO:
        return {}
    return logged_eval_metrics(trainer.state) or trainer.evaluate()


def save_trained_model(trainer, processor, info, model_args):
    """Save the model (or adapter), its processor and training info; return the merged folder."""
    output_dir = trainer.args.output_dir
    # The weights go last: a run killed before them leaves no model to load, never one
    # without its prompt.
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        write_training_info(output_dir, info)
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return ''
    share_weight_files(output_dir)
    if not model_args.merge_lora:
        return ''
    return merge_lora(trainer, model_args, info, processor, output_dir)


def result_line(steps, metrics, eval_metrics, finished_from, eval_trained_on):
    """Return the run's summary: its loss (or the checkpoint it finished from) and scores."""
    start = (f"train loss {metrics['train_loss']:.4f} after " if 'train_loss' in metrics
             else f'finished from {finished_from} after ')
    scores = ''.join(f', {name} {eval_metrics[name]:.4f}' for name in SUMMARY_METRICS
                     if name in eval_metrics)
    caveat = (' (eval images were trained on: not held-out scores)'
              if eval_metrics and eval_trained_on else '')
    return f'{start}{steps} steps{scores}{caveat}'


def main(argv=None):
    """Fine-tune BLIP-2; return the exit status (raises SystemExit with a message on errors)."""
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                        level=logging.INFO)
    threads = torch.get_num_threads()
    try:
        return run(argv)
    except (TrainingError, CheckpointError, DatasetError) as error:
        raise SystemExit(f'error: {error}') from None
    finally:
        # --cpu_threads is for this run only (tests and notebooks call main repeatedly).
        torch.set_num_threads(threads)


def run(argv=None):
    """Do the work of :func:`main`; raises TrainingError / CheckpointError / DatasetError."""
    # 1. Parse arguments; seed everything (model init, LoRA init, data order, dropout).
    model_args, data_args, training_args = parse_arguments(argv)
    check_datasets_package()
    set_seed(training_args.seed)
    if training_args.cpu_threads:
        torch.set_num_threads(training_args.cpu_threads)

    # 2. Find the checkpoint to resume from (the rules: training.checkpoints).
    resume_from, finishing = choose_resume_checkpoint(training_args)

    # 3. Data: validate before anything expensive, then read the splits.
    data = load_data(data_args, training_args)

    # 4. Model, and the Trainer around it.
    model, processor = prepare_model(model_args, training_args)
    info = training_info(model_args, data_args, unwrap_blip2(model))
    trainer, stopper = build_trainer(model, processor, data, info, data_args, training_args)

    # 5. Train, or finish a run cut after its last checkpoint; then evaluate the final weights.
    if finishing:
        metrics = load_finished_checkpoint(trainer, resume_from)
    else:
        train_result = trainer.train(resume_from_checkpoint=resume_from)
        if stopper.reason:
            return report_stop(trainer, stopper)
        metrics = dict(train_result.metrics)
    eval_metrics = final_eval_metrics(trainer, data)

    # 6. Save the model (or adapter) with its processor and training prompt.
    merged_dir = save_trained_model(trainer, processor, info, model_args)

    # 7. Save metrics, and say what was saved.
    trainer.save_metrics('train', metrics)
    if eval_metrics:
        trainer.save_metrics('eval', eval_metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        what = 'LoRA adapter' if model_args.method == 'lora' else 'model'
        merged = f' (merged model: {merged_dir})' if merged_dir else ''
        print(f'saved {what} to {training_args.output_dir}{merged}')
        print(result_line(trainer.state.global_step, metrics, eval_metrics, resume_from,
                          data.trained_eval_images))
    return 0


if __name__ == '__main__':
    sys.exit(main())
