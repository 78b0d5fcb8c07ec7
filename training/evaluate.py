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
Score BLIP-2 captions with the COCO caption metrics (pycocoevalcap).

    python -m training.evaluate --model M [--adapter A] --data DIR [--split val] --out OUT
    python -m training.evaluate --model M --compare BASE --data DIR --out OUT
    python -m training.evaluate --model M [--adapter A] --compare-base --data DIR --out OUT
    python -m training.evaluate --results RESULTS.json --annotations ANNOTATIONS.json

Captions come from :class:`blip2_ros.captioner.Blip2Captioner` with greedy decoding, so the
numbers describe what the node will publish. Each model captions with the prompt saved by
training in its own folder (``--prompt`` sets one for all). Scores: BLEU-1..4, METEOR, ROUGE-L,
CIDEr, SPICE when its models are installed, and exact match (a prediction equal to one of the
references after tokenization); ``--metrics`` picks some of them. METEOR and the PTB tokenizer
need Java: without it METEOR is reported unavailable and a simple lower-case/punctuation
tokenizer is used instead; a metric that fails never hides the others.

With ``--compare`` (or ``--compare-base``: the model that training started from, i.e.
``--model`` without ``--adapter``, or the base recorded beside a fine-tuned model folder) the
baseline is scored on the same images, and one warning line names every metric on which the
model scores below it, with both values.

An empty caption (no word after tokenization: the model ended it at once) is not a caption:
it is counted (``empty_captions`` in metrics.json and the table) and scored as a miss by every
metric, as a word that no reference holds, so a model that says nothing never scores better
than one that says something wrong. Whether such a caption came from non-finite logits cannot
be told from the text the captioner returns; both are counted here.
"""

import argparse
import contextlib
from dataclasses import dataclass, field
import functools
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

from blip2_ros.checkpoint import one_line
from training.coco import DatasetError, dumps, image_path, write_text_atomic

LOGGER = logging.getLogger('training.evaluate')

METRIC_ORDER = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE',
                'exact_match')
# What --metrics accepts; 'Bleu' gives Bleu_1..Bleu_4 together.
ALL_METRICS = ('Bleu', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE', 'exact_match')
# What pycocoevalcap's PTBTokenizer drops after tokenizing.
PUNCTUATION_TOKENS = {"''", "'", '``', '`', '-lrb-', '-rrb-', '-lcb-', '-rcb-', '.', '?', '!',
                      ',', ':', '-', '--', '...', ';'}
# What the PTB tokenizer's lexer (run with -preserveLines) ends a line at.
PTB_LINE_BREAKS = re.compile(r'[\n\r\v\f\u2028\u2029]')


class EvaluationError(RuntimeError):
    """A problem the user can fix (files, arguments, model); the message is one line."""


@dataclass
class Scores:
    """Metric values, metrics that could not run (name -> reason), and the tokenizer used."""

    scores: dict = field(default_factory=dict)
    unavailable: dict = field(default_factory=dict)
    tokenizer: str = ''
    images: int = 0
    empty_captions: int = 0


@functools.lru_cache(maxsize=None)
def java_available():
    """Return True if a ``java`` that runs is on the PATH (PTB tokenizer, METEOR, SPICE)."""
    java = shutil.which('java')
    if java is None:
        return False
    try:
        return subprocess.run([java, '-version'], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def simple_tokenize(text):
    """Lower-case, split off punctuation and drop it, the way the PTB tokenizer's output looks."""
    tokens = re.findall(r"\w+(?:'\w+)?|[^\w\s]+", text.lower())
    return ' '.join(token for token in tokens if token not in PUNCTUATION_TOKENS)


def tokenize(captions, tokenizer):
    """Tokenize ``{image_id: [caption, ...]}`` with 'ptb' or 'simple'; same shape back."""
    if tokenizer == 'simple':
        return {key: [simple_tokenize(text) for text in texts] for key, texts in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # PTBTokenizer pairs its output lines with the captions in order and only replaces '\n':
    # any other line break the Java lexer knows would shift every later caption to the wrong
    # image.
    with java_stderr_logged():
        return PTBTokenizer().tokenize(
            {key: [{'caption': PTB_LINE_BREAKS.sub(' ', text)} for text in texts]
             for key, texts in captions.items()})


@contextlib.contextmanager
def java_stderr_logged():
    """
    Send what child processes write to stderr to this module's log while the block runs.

    The PTB tokenizer's Java process prints a speed line on every call; it goes to the debug
    log (--verbose), and to a warning if the block fails, so a Java error is never lost.
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode('utf-8', errors='replace').strip()
            if text:
                LOGGER.log(logging.WARNING if failed else logging.DEBUG, '%s', text)


def spice_models_installed():
    """Return True if SPICE's Stanford CoreNLP jar is there (it is downloaded at first use)."""
    try:
        from pycocoevalcap.spice import get_stanford_models
    except ImportError:
        return False
    jar = os.path.join(get_stanford_models.SPICEDIR, get_stanford_models.SPICELIB,
                       get_stanford_models.JAR + '.jar')
    return os.path.isfile(jar)


def _scorer(name):
    if name == 'Bleu':
        from pycocoevalcap.bleu.bleu import Bleu
        return Bleu(4)
    if name == 'METEOR':
        from pycocoevalcap.meteor.meteor import Meteor
        return Meteor()
    if name == 'ROUGE_L':
        from pycocoevalcap.rouge.rouge import Rouge
        return Rouge()
    if name == 'CIDEr':
        from pycocoevalcap.cider.cider import Cider
        return Cider()
    from pycocoevalcap.spice.spice import Spice
    return Spice()


def parse_metrics(text):
    """
    Return the metric names of a comma-separated list such as 'Bleu,ROUGE_L,CIDEr,exact_match'.

    Names are matched without regard to case, and Bleu_1..Bleu_4 mean 'Bleu'; the result is in
    the order of :data:`ALL_METRICS`. An empty text or 'all' means every metric.
    """
    known = {name.lower(): name for name in ALL_METRICS}
    known.update({f'bleu_{order}': 'Bleu' for order in range(1, 5)})
    requested = [part.strip() for part in (text or '').split(',') if part.strip()]
    if not requested or [part.lower() for part in requested] == ['all']:
        return ALL_METRICS
    unknown = [part for part in requested if part.lower() not in known]
    if unknown:
        raise EvaluationError(f'unknown metric {unknown[0]!r}: choose from '
                              f"{','.join(ALL_METRICS)} (comma-separated) or all")
    chosen = {known[part.lower()] for part in requested}
    return tuple(name for name in ALL_METRICS if name in chosen)


def exact_match(references, predictions):
    """Return the fraction of images whose prediction equals one of its references."""
    if not predictions:
        return 0.0
    hits = sum(1 for key, texts in predictions.items() if texts[0] in references[key])
    return hits / len(predictions)


def missing_caption_word(references):
    """Return a word that no reference holds: what an empty caption is scored as."""
    words = {word for texts in references.values() for text in texts
             for word in simple_tokenize(text).split()}
    word = 'nocaption'
    while word in words:
        word += 'x'
    return word


def score_captions(references, predictions, metrics=ALL_METRICS, tokenizer='auto',
                   spice='auto'):
    """
    Score ``{image_id: caption}`` predictions against ``{image_id: [reference, ...]}``.

    ``metrics``: names from :data:`ALL_METRICS`; the others are not computed. ``tokenizer``:
    'ptb' (pycocoevalcap's, needs Java), 'simple', or 'auto' (ptb when Java runs). ``spice``:
    'auto' runs SPICE only when its models are installed, 'always' lets it try to download
    them, 'never' skips it. Returns :class:`Scores`.

    Empty predictions (no word) are counted in ``Scores.empty_captions`` and scored as misses:
    each is replaced by one word that no reference holds (ROUGE-L and METEOR cannot score an
    empty caption at all).
    """
    unknown = [name for name in metrics if name not in ALL_METRICS]
    if unknown:
        raise EvaluationError(f'unknown metric {unknown[0]!r}: choose from '
                              f"{','.join(ALL_METRICS)}")
    missing = [key for key in predictions if key not in references]
    if missing:
        example = missing[0]
        reference_types = sorted({type(key).__name__ for key in references})
        mismatch = ''
        if references and type(example).__name__ not in reference_types:
            mismatch = (f' (an image_id of type {type(example).__name__}, but the '
                        f"references' ids are {' and '.join(reference_types)}: use the same "
                        'type in both files)')
        raise EvaluationError(f'{len(missing)} predicted image(s) have no references, '
                              f'e.g. image {example!r}{mismatch}')
    result = Scores(images=len(predictions))
    has_java = java_available()
    if tokenizer == 'auto':
        tokenizer = 'ptb' if has_java else 'simple'
        if not has_java:
            LOGGER.warning('java not found: using a simple lower-case/punctuation tokenizer '
                           'instead of the PTB tokenizer%s (install a Java runtime for the '
                           'official numbers)',
                           ', and METEOR is unavailable' if 'METEOR' in metrics else '')
    if tokenizer == 'ptb' and not has_java:
        raise EvaluationError('the PTB tokenizer needs Java: install a Java runtime or use '
                              'tokenizer simple')
    result.tokenizer = tokenizer
    empty = {key for key, caption in predictions.items() if not simple_tokenize(caption)}
    result.empty_captions = len(empty)
    if empty:
        LOGGER.warning('%d of %d captions are empty: scored as misses', len(empty),
                       len(predictions))
        missing = missing_caption_word({key: references[key] for key in predictions})
        predictions = {key: missing if key in empty else caption
                       for key, caption in predictions.items()}
    gts = tokenize({key: list(references[key]) for key in predictions}, tokenizer)
    res = tokenize({key: [predictions[key]] for key in predictions}, tokenizer)
    if not res:
        raise EvaluationError('no predictions to score')
    for name in metrics:
        if name == 'exact_match':
            result.scores[name] = exact_match(gts, res)
            continue
        if name in ('METEOR', 'SPICE') and not has_java:
            result.unavailable[name] = 'needs Java'
            continue
        if name == 'SPICE' and spice != 'always' and (spice == 'never'
                                                      or not spice_models_installed()):
            result.unavailable[name] = ('needs the Stanford CoreNLP models, downloaded at '
                                        'first use (pass --spice to try)')
            continue
        printed = io.StringIO()
        try:
            # pycocoevalcap prints its statistics; keep the caller's output to the table.
            with contextlib.redirect_stdout(printed):
                score, _ = _scorer(name).compute_score(gts, res)
        except Exception as error:  # noqa: B902 - an optional metric must not sink the others
            result.unavailable[name] = one_line(error, 200)
            LOGGER.warning('%s unavailable: %s', name, result.unavailable[name])
            continue
        LOGGER.debug('%s: %s', name, printed.getvalue().strip())
        if name == 'Bleu':
            for order, value in enumerate(score, start=1):
                result.scores[f'Bleu_{order}'] = float(value)
        else:
            result.scores[name] = float(score)
    return result


# ---------------------------------------------------------------------------------------------
# Files


def _read_json(path, what):
    try:
        with open(path, encoding='utf-8') as stream:
            return json.load(stream)
    except FileNotFoundError:
        raise EvaluationError(f'{what} file {path} does not exist') from None
    except (OSError, ValueError) as error:
        raise EvaluationError(f'cannot read {what} file {path}: {one_line(error, 200)}') from None


def _id_and_caption(entry, where):
    """Return an entry's (image_id, caption); raise EvaluationError if either is unusable."""
    if not isinstance(entry, dict) or 'image_id' not in entry or 'caption' not in entry:
        raise EvaluationError(f'{where} needs image_id and caption, got {one_line(entry, 200)}')
    image_id, caption = entry['image_id'], entry['caption']
    # Ids are dict keys and are compared with the other file's: integers (COCO) or strings.
    if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
        raise EvaluationError(f'{where}: image_id must be an integer (or a string), not '
                              f'{one_line(json.dumps(image_id), 200)}')
    if not isinstance(caption, str):
        raise EvaluationError(f'{where}: caption must be a string, not '
                              f'{one_line(json.dumps(caption), 200)}')
    return image_id, caption


def references_from_coco(annotations):
    """Return ``{image_id: [caption, ...]}`` from a COCO captions dict."""
    if not isinstance(annotations, dict) or not isinstance(annotations.get('annotations'), list):
        raise EvaluationError('annotations must be a COCO captions object with an '
                              '"annotations" list')
    references = {}
    for index, entry in enumerate(annotations['annotations']):
        image_id, caption = _id_and_caption(entry, f'annotations[{index}]')
        # An empty reference would count an empty prediction as a perfect caption.
        if not caption.strip():
            raise EvaluationError(f'annotations[{index}]: caption is empty; remove it or give '
                                  'the text')
        references.setdefault(image_id, []).append(caption)
    return references


def predictions_from_results(results):
    """Return ``{image_id: caption}`` from a COCO results list; one caption per image."""
    if not isinstance(results, list):
        raise EvaluationError('results must be a JSON list of {"image_id", "caption"}')
    predictions = {}
    for index, entry in enumerate(results):
        image_id, caption = _id_and_caption(entry, f'result {index}')
        if image_id in predictions:
            raise EvaluationError(f'results hold two captions for image {image_id!r}: keep '
                                  'one per image')
        predictions[image_id] = caption
    return predictions


def score_files(results_path, annotations_path, **options):
    """Score a COCO results file against a COCO captions annotations file."""
    predictions = predictions_from_results(_read_json(results_path, 'results'))
    references = references_from_coco(_read_json(annotations_path, 'annotations'))
    return score_captions(references, predictions, **options)


def write_json(path, data):
    """Write JSON with sorted keys (results and metrics files), replacing ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_text_atomic(path, dumps(data))


def training_prompt(*folders, default=''):
    """Return the prompt saved by training.train in the first folder that has one."""
    from blip2_ros.checkpoint import ModelLoadError, training_prompt as saved_prompt
    try:
        return saved_prompt(*folders, default=default)
    except ModelLoadError as error:
        raise EvaluationError(str(error)) from None


# ---------------------------------------------------------------------------------------------
# Captioning a split


def caption_split(model, adapter, folder, records, prompt, device='auto', dtype='auto',
                  batch_size=16, max_new_tokens=30, trust_remote_code=False):
    """Caption every image of ``records`` with Blip2Captioner; return ``{image_id: caption}``."""
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig, ModelLoadError
    from training.data import load_rgb
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    if not LOGGER.isEnabledFor(logging.DEBUG):
        # A bar per model load: for small models a line of noise (--verbose shows it).
        transformers_logging.disable_progress_bar()
    try:
        captioner = Blip2Captioner(CaptionerConfig(
            model=model, adapter=adapter, device=device, dtype=dtype, prompt=prompt,
            max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code))
    except ModelLoadError as error:
        raise EvaluationError(str(error)) from error
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    predictions = {}
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        frames = [load_rgb(image_path(folder, record.file_name)) for record in batch]
        for record, caption in zip(batch, captioner.caption(frames)):
            predictions[record.image_id] = caption
        LOGGER.debug('captioned %d/%d images', min(start + batch_size, len(records)),
                     len(records))
    return predictions


def format_table(columns):
    """Render ``[(title, Scores), ...]`` as a text table, one metric per row."""
    names = [name for name in METRIC_ORDER
             if any(name in scores.scores or name in scores.unavailable
                    for _, scores in columns)]
    titles = [title for title, _ in columns]
    if len(columns) == 2:
        titles.append('change')
    width = max(12, *(len(title) + 2 for title in titles))
    lines = ['metric'.ljust(12) + ''.join(title.rjust(width) for title in titles)]
    for name in names:
        cells = []
        for _, scores in columns:
            value = scores.scores.get(name)
            cells.append(f'{value:.3f}' if value is not None else 'n/a')
        if len(columns) == 2:
            first, second = (scores.scores.get(name) for _, scores in columns)
            cells.append(f'{second - first:+.3f}' if None not in (first, second) else '')
        lines.append(name.ljust(12) + ''.join(cell.rjust(width) for cell in cells))
    for title, scores in columns:
        for name, reason in sorted(scores.unavailable.items()):
            lines.append(f'{name} unavailable for {title}: {reason}')
    for title, scores in columns:
        if scores.empty_captions:
            lines.append(f'empty captions from {title}: {scores.empty_captions} of '
                         f'{scores.images} (scored as misses)')
    tokenizers = sorted({scores.tokenizer for _, scores in columns})
    lines.append(f"images: {columns[0][1].images}; tokenizer: {', '.join(tokenizers)}")
    return '\n'.join(lines)


def worse_than_baseline(baseline, model):
    """Return ``'CIDEr 0.412 < 0.530, ...'`` for each metric the model scores lower on, or ''."""
    lower = [f'{name} {model.scores[name]:.3f} < {baseline.scores[name]:.3f}'
             for name in METRIC_ORDER
             if name in model.scores and name in baseline.scores
             and model.scores[name] < baseline.scores[name] - 1e-9]
    return ', '.join(lower)


# A hub id as from_pretrained takes it: 'name' or 'owner/name', no spaces.
HUB_ID = re.compile(r'[\w.-]+(/[\w.-]+)?')


def recorded_base(model, adapter=''):
    """
    Return the model that ``model`` (with ``adapter``) was fine-tuned from, for --compare-base.

    An adapter's base is ``model`` itself. A fine-tuned model folder names its base in the
    training info that training.train saved beside it; that base must load here (a folder
    that exists, or a hub id), else EvaluationError says to name it with --compare.
    """
    from blip2_ros.checkpoint import model_location, TRAINING_INFO_FILE

    if adapter:
        return model
    info_path = os.path.join(os.path.expanduser(model), TRAINING_INFO_FILE)
    if not os.path.isfile(info_path):
        raise EvaluationError(f'--compare-base: {model} does not say which model it was '
                              f'fine-tuned from (no {TRAINING_INFO_FILE}): name the base '
                              'with --compare')
    base = _read_json(info_path, 'training info')
    base = base.get('base_model', '') if isinstance(base, dict) else ''
    location, kind = model_location(base) if isinstance(base, str) and base else ('', '')
    if kind == 'folder' or (kind == 'hub' and HUB_ID.fullmatch(base)):
        return base
    raise EvaluationError(f'--compare-base: the base recorded in {info_path} ({base!r}) is '
                          'not a model folder here or a hub id: name the base with --compare')


def _scores_json(scores):
    return {'scores': scores.scores, 'unavailable': scores.unavailable,
            'tokenizer': scores.tokenizer, 'images': scores.images,
            'empty_captions': scores.empty_captions}


def evaluate_models(args):
    """Caption a split with the model (and the --compare baseline), score, write, print."""
    from training.data import load_split, unsplit_warning
    from training.validate import check_dataset

    # As training does: captions of unknown images or duplicate ids would be scored silently.
    check_dataset(args.data, decode_images=False)
    records = [record for record in load_split(args.data, args.split) if record.captions]
    unsplit = unsplit_warning(args.data, ('train', 'val', args.split))
    if unsplit:
        LOGGER.warning(unsplit)
    if args.max_images:
        records = records[:args.max_images]
    if not records:
        raise EvaluationError(f"split '{args.split}' of {args.data} has no captioned image")
    references = {record.image_id: list(record.captions) for record in records}
    metrics = parse_metrics(args.metrics)
    prompt = args.prompt
    if prompt is None:
        prompt = training_prompt(args.adapter, args.model)
    runs = [('model', args.model, args.adapter, prompt)]
    baseline = 'baseline'
    if args.compare_base:
        args.compare, args.compare_adapter, baseline = recorded_base(args.model,
                                                                     args.adapter), '', 'base'
    elif not args.compare and knows_base(args.model, args.adapter):
        LOGGER.info('add --compare-base to score the model it was fine-tuned from beside it')
    if args.compare:
        baseline_prompt = args.prompt
        if baseline_prompt is None:
            # A baseline trained with another prompt is judged with its own; a model that was
            # never trained here (a hub checkpoint) gets the same prompt as the model.
            baseline_prompt = training_prompt(args.compare_adapter, args.compare,
                                              default=prompt)
        runs.insert(0, (baseline, args.compare, args.compare_adapter, baseline_prompt))
    columns = []
    results = {}
    report = {'split': args.split, 'data': args.data, 'prompt': prompt, 'models': {}}
    for title, model, adapter, run_prompt in runs:
        LOGGER.info('%s: captioning %d images with prompt %r', title, len(records),
                    run_prompt)
        predictions = caption_split(model, adapter, args.data, records, run_prompt,
                                    args.device, args.dtype, args.batch_size,
                                    args.max_new_tokens, args.trust_remote_code)
        scores = score_captions(references, predictions, metrics=metrics,
                                tokenizer=args.tokenizer,
                                spice='always' if args.spice else 'auto')
        results[f'results_{title}.json'] = [{'image_id': key, 'caption': value}
                                            for key, value in predictions.items()]
        report['models'][title] = {'model': model, 'adapter': adapter, 'prompt': run_prompt,
                                   **_scores_json(scores)}
        columns.append((title, scores))
    if len(columns) == 2:
        worse = worse_than_baseline(columns[0][1], columns[1][1])
        if worse:
            LOGGER.warning('the model scores below its %s on %s: fine-tuning made it worse '
                           'there (check the prompt, the steps and the data)', baseline, worse)
    # Only when every model has run: a failing one must not leave the other's results beside
    # an older metrics.json.
    for file_name, entries in results.items():
        write_json(os.path.join(args.out, file_name), entries)
    write_json(os.path.join(args.out, 'metrics.json'), report)
    return columns


def knows_base(model, adapter=''):
    """Return True if --compare-base would find the model that ``model`` was tuned from."""
    try:
        return bool(recorded_base(model, adapter))
    except EvaluationError:
        return False


def build_parser():
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog='python -m training.evaluate', description=__doc__.strip().splitlines()[0])
    parser.add_argument('--model', help='BLIP-2 checkpoint (hub id or folder) to caption with')
    parser.add_argument('--adapter', default='', help='LoRA adapter folder for --model')
    parser.add_argument('--compare', default='',
                        help='baseline checkpoint scored on the same split, shown beside it')
    parser.add_argument('--compare_adapter', '--compare-adapter', default='',
                        help='LoRA adapter folder for --compare')
    parser.add_argument('--compare_base', '--compare-base', action='store_true',
                        help='compare with the model training started from: --model without '
                        '--adapter, or the base recorded in the model folder; warns where '
                        'fine-tuning made a metric worse')
    parser.add_argument('--data', help='dataset folder (images/, annotations.json, splits)')
    parser.add_argument('--split', default='val', help="split to score ('all': every image)")
    parser.add_argument('--out', help='folder for results_*.json and metrics.json')
    parser.add_argument('--prompt', default=None,
                        help='prompt before each caption, for the model and the baseline '
                             "(default: each one's prompt saved by training; a baseline "
                             "without one uses the model's)")
    parser.add_argument('--max_new_tokens', '--max-new-tokens', type=int, default=30)
    parser.add_argument('--batch_size', '--batch-size', type=int, default=16)
    parser.add_argument('--max_images', '--max-images', type=int, default=0,
                        help='score only the first N images of the split (0: all)')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--dtype', default='auto', help='auto, float32, bfloat16, float16')
    parser.add_argument('--trust_remote_code', '--trust-remote-code', action='store_true',
                        help="run the code a checkpoint's config.json names (auto_map); only "
                             'for checkpoints you trust')
    parser.add_argument('--results', help='score this COCO results file instead of a model')
    parser.add_argument('--annotations', help='COCO captions file with the references')
    parser.add_argument('--tokenizer', choices=('auto', 'ptb', 'simple'), default='auto',
                        help='ptb needs Java; auto falls back to simple without it')
    parser.add_argument('--metrics', default='all',
                        help='comma-separated metrics to compute, e.g. '
                             'Bleu,ROUGE_L,CIDEr,exact_match (skips the Java start-up of '
                             f"METEOR); from {','.join(ALL_METRICS)} (default: all)")
    parser.add_argument('--spice', action='store_true',
                        help='run SPICE even if its models must be downloaded first')
    parser.add_argument('--verbose', action='store_true',
                        help='also log captioning progress, progress bars of model loading and '
                        "the Java tokenizer's output")
    return parser


def main(argv=None):
    """Command line; prints the table, writes JSON; exits with a one-line message on errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format='%(levelname)s %(name)s: %(message)s', level=logging.INFO)
    level = LOGGER.level
    if args.verbose:
        LOGGER.setLevel(logging.DEBUG)
    try:
        return _run(args)
    finally:
        LOGGER.setLevel(level)


def _run(args):
    """Do the work of :func:`main` with parsed arguments."""
    try:
        if args.results or args.annotations:
            if not (args.results and args.annotations):
                raise EvaluationError('--results and --annotations go together')
            scores = score_files(args.results, args.annotations,
                                 metrics=parse_metrics(args.metrics), tokenizer=args.tokenizer,
                                 spice='always' if args.spice else 'auto')
            columns = [('results', scores)]
            if args.out:
                write_json(os.path.join(args.out, 'metrics.json'),
                           {'results': args.results, 'annotations': args.annotations,
                            'models': {'results': _scores_json(scores)}})
        else:
            missing = [flag for flag, value in (('--model', args.model), ('--data', args.data),
                                                ('--out', args.out)) if not value]
            if args.compare_base and (args.compare or args.compare_adapter):
                raise EvaluationError('--compare-base chooses the baseline itself: leave out '
                                      '--compare and --compare-adapter')
            if missing:
                raise EvaluationError(f"{', '.join(missing)} required (or --results with "
                                      '--annotations)')
            columns = evaluate_models(args)
    except (EvaluationError, DatasetError) as error:
        # Our own messages end with what to do: shortening them could cut that off.
        raise SystemExit(f"error: {' '.join(str(error).split())}") from None
    except OSError as error:
        raise SystemExit(f'error: {one_line(error, 200)}') from None
    except KeyboardInterrupt:
        print('evaluate: interrupted; results are written only once every model has run',
              file=sys.stderr)
        return 130
    print(format_table(columns))
    return 0


if __name__ == '__main__':
    sys.exit(main())
