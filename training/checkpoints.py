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
Training checkpoints: which are complete, which one a run resumes, which may be deleted.

The contract, as training.train keeps it:

- A checkpoint is a folder ``OUTPUT_DIR/checkpoint-N`` (N: the optimizer step). The Trainer
  writes it; it is *complete* once it holds ``checkpoint_complete.json`` (the marker) and every
  file the marker lists still has the size it lists. The marker is written last, atomically,
  after every process has saved its part (a barrier) and after the training info and weight
  file modes are in place, so it vouches for all of them.
- Resume: ``--resume`` picks the complete checkpoint with the highest step and skips the
  others with a warning; ``--resume_from_checkpoint PATH`` must be complete or is refused
  (resuming a part-written one would restart the optimizer, the LR schedule or the RNG
  without a word). Without either, an OUTPUT_DIR that holds checkpoints is refused.
- Rotation (``--save_total_limit``) runs after a marker is written, never before: incomplete
  folders are deleted first, then the oldest complete ones, until the limit is met. Never
  deleted: the newest complete checkpoint, the one just saved and the best one. So an
  incomplete folder never takes the place of a complete one, and the limit can be exceeded.
- kill -9 (or a crash, a full disk) while a checkpoint is written leaves its folder without
  a marker: resume skips it and takes the previous checkpoint, which rotation has not touched
  because no newer complete one exists. SIGINT / SIGTERM save a checkpoint at the end of the
  current step and stop; a second one stops at once, which is the kill -9 case.
- A run is *finished* when a checkpoint is at the last step of its schedule and OUTPUT_DIR
  holds the saved model: resuming it is refused. A checkpoint at the last step without a
  saved model (cut during the final evaluation or save) is finished by ``--resume`` without
  training: its weights and state are loaded, then evaluated and saved as the run would have.

Why not the Trainer's own resume (``resume_from_checkpoint=True``, ``get_last_checkpoint``):
the Trainer makes the ``checkpoint-N`` folder first and then writes the weights, optimizer,
scheduler, RNG and trainer state into it one after another, and rotates old checkpoints
before any callback runs. ``get_last_checkpoint`` returns the highest-numbered folder whether
or not it is whole, and the Trainer skips a missing optimizer or RNG file with at most an
info line. A kill -9 mid-write would thus be resumed from half a checkpoint, and its
rotation may already have deleted the last whole one. So the Trainer still writes and loads
checkpoints; this module only chooses which folder it loads and which ones are deleted.
"""

import json
import logging
import math
import os
from pathlib import Path
import re
import shutil
import signal

import torch
from training.coco import write_text_atomic
from transformers import TrainerCallback

LOGGER = logging.getLogger('training.checkpoints')

CHECKPOINT_MARKER = 'checkpoint_complete.json'
CHECKPOINT_PATTERN = re.compile(r'^checkpoint-(\d+)$')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed, or an output folder in use; the message is one line."""


def write_checkpoint_marker(folder, step):
    """Record that ``folder`` was written completely: its files and their sizes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name == CHECKPOINT_MARKER:
                continue
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    write_text_atomic(os.path.join(folder, CHECKPOINT_MARKER),
                      json.dumps({'step': step, 'files': files}, indent=1, sort_keys=True))


def checkpoint_problem(folder):
    """Return why ``folder`` is not a complete checkpoint, or '' if it is."""
    marker = os.path.join(folder, CHECKPOINT_MARKER)
    try:
        with open(marker, encoding='utf-8') as stream:
            files = json.load(stream)['files']
    except FileNotFoundError:
        return f'no {CHECKPOINT_MARKER} (cut off while saving?)'
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f'unreadable {CHECKPOINT_MARKER}: {error}'
    for name, size in sorted(files.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f'{name} is missing'
        if os.path.getsize(path) != size:
            return f'{name} has {os.path.getsize(path)} bytes, {size} were written'
    return ''


def list_checkpoints(output_dir):
    """Return ``(step, folder)`` for every checkpoint-N folder in ``output_dir``, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_resume_checkpoint(output_dir):
    """Return the newest complete checkpoint in ``output_dir`` (None if none), warning on skips."""
    for _, folder in list_checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if not problem:
            return folder
        LOGGER.warning('skipping incomplete checkpoint %s: %s', folder, problem)
    return None


def rotate_checkpoints(output_dir, keep, protected=()):
    """
    Delete checkpoints until ``keep`` are left; return the deleted folders.

    Incomplete folders go first, as no resume reads them, then the oldest complete ones.
    Never deleted: the folders in ``protected`` (the one just saved, the best one) and the
    newest complete one, which --resume picks. Those can leave more than ``keep``, as the
    Trainer's rotation does.
    """
    if not keep or keep < 1:
        return []
    checkpoints = [folder for _, folder in list_checkpoints(output_dir)]
    complete = [folder for folder in checkpoints if not checkpoint_problem(folder)]
    kept = {os.path.realpath(folder) for folder in list(protected) + complete[:1] if folder}
    candidates = ([folder for folder in reversed(checkpoints) if folder not in complete]
                  + list(reversed(complete)))
    deleted = []
    for folder in candidates:
        if len(checkpoints) - len(deleted) <= keep:
            break
        if os.path.realpath(folder) in kept:
            continue
        LOGGER.info('deleting %s checkpoint %s (--save_total_limit %d)',
                    'complete' if folder in complete else 'incomplete', folder, keep)
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    return deleted


def check_resume_checkpoint(folder):
    """Raise CheckpointError unless ``folder``, from --resume_from_checkpoint, is complete."""
    if not os.path.isdir(folder):
        raise CheckpointError(f'--resume_from_checkpoint {folder} is not a folder: give a '
                              'checkpoint-N folder, or use --resume')
    problem = checkpoint_problem(folder)
    if problem:
        raise CheckpointError(f'--resume_from_checkpoint {folder} is not a complete checkpoint '
                              f'({problem}): give another checkpoint-N folder, or use --resume '
                              'for the newest complete one in --output_dir')


def finished_run_problem(checkpoint, training_args):
    """Return why resuming ``checkpoint`` would train past the end of its run, or None."""
    try:
        with open(os.path.join(checkpoint, 'trainer_state.json'), encoding='utf-8') as stream:
            state = json.load(stream)
    except (OSError, ValueError):
        return None  # checkpoint_problem() speaks for unreadable checkpoints
    step = state.get('global_step') or 0
    if training_args.max_steps > 0:
        last = training_args.max_steps
    elif state.get('num_train_epochs') == math.ceil(training_args.num_train_epochs):
        last = state.get('max_steps') or 0
    else:
        return None
    if last and step >= last:
        # The Trainer would train one step past the schedule and overwrite the saved model.
        return (f'{checkpoint} is the end of its run (step {step} of {last}): raise '
                '--max_steps or --num_train_epochs to train further, or choose a new '
                '--output_dir')
    return None


def saved_weights(output_dir):
    """Return the model or adapter weight files a finished run saved in ``output_dir``."""
    return sorted(Path(output_dir).glob('*.safetensors')) + sorted(
        Path(output_dir).glob('*.safetensors.index.json'))


def choose_resume_checkpoint(training_args):
    """
    Return ``(checkpoint, finishing)``: the checkpoint to resume (None: start afresh).

    ``finishing`` is True when that checkpoint ends its run and the run was cut before it
    saved its model: the run is then finished from it without training. Raises
    CheckpointError where the contract above says no.
    """
    output_dir = training_args.output_dir
    resume_from = training_args.resume_from_checkpoint
    if resume_from:
        check_resume_checkpoint(resume_from)
    elif training_args.resume:
        resume_from = find_resume_checkpoint(output_dir)
        if resume_from is None:
            LOGGER.warning('--resume: no complete checkpoint in %s, starting from scratch',
                           output_dir)
        else:
            LOGGER.info('resuming from %s', resume_from)
    elif list_checkpoints(output_dir):
        raise CheckpointError(f'{output_dir} already holds checkpoints: add --resume to continue '
                              'that run, or choose an empty --output_dir')
    problem = resume_from and finished_run_problem(resume_from, training_args)
    if problem and (not training_args.resume or saved_weights(output_dir)):
        raise CheckpointError(problem)
    if problem:
        LOGGER.info('%s ends its run; saving the model from it, without training', resume_from)
    return resume_from, bool(problem)


def load_finished_checkpoint(trainer, checkpoint):
    """
    Give ``trainer`` the weights and state of the checkpoint that ends its run; no training.

    Returns the train metrics the checkpoint can tell (the mean loss of a run is only known to
    the process that ran it).
    """
    from transformers.trainer_callback import TrainerState

    # The one private Trainer call here, for want of a public one: Trainer.train() would train
    # a step past the schedule from this checkpoint, and the public loaders (peft's
    # load_adapter, transformers' load_sharded_checkpoint) each read one of the layouts
    # (adapter, single file, shards, FSDP) that this method tells apart as the Trainer saved
    # them.
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, 'trainer_state.json'))
    return {'epoch': trainer.state.epoch}


def is_distributed():
    """Return True when this process is one of several (torchrun, accelerate launch)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class CheckpointMarkerCallback(TrainerCallback):
    """
    Complete each checkpoint: add the run's own files, then the marker, once all ranks saved.

    Then keep ``keep_checkpoints`` of them (:func:`rotate_checkpoints`); the Trainer must be
    given ``save_total_limit=None``, or it deletes older ones before the new one is complete.
    """

    def __init__(self, add_files, keep_checkpoints=None):
        """``add_files(folder)`` writes what else belongs in a checkpoint, before its marker."""
        self.add_files = add_files
        self.keep_checkpoints = keep_checkpoints

    def on_save(self, args, state, control, **kwargs):
        """Mark ``checkpoint-<step>`` complete (the Trainer calls this after saving it)."""
        if is_distributed():
            # Every rank writes its own RNG state; the marker must come after all of them.
            torch.distributed.barrier()
        folder = os.path.join(args.output_dir, f'checkpoint-{state.global_step}')
        if state.is_world_process_zero and os.path.isdir(folder):
            self.add_files(folder)
            write_checkpoint_marker(folder, state.global_step)
            rotate_checkpoints(args.output_dir, self.keep_checkpoints,
                               protected=(folder, state.best_model_checkpoint))


class GracefulStopCallback(TrainerCallback):
    """
    Turn SIGINT/SIGTERM (or --stop_after_steps) into 'save a checkpoint, then stop'.

    The signal handler only sets a flag; the stop happens at the end of the current optimizer
    step, where the Trainer can save consistently. A second signal stops at once. In the last
    step there is nothing left to stop: the run ends as usual and saves its model.
    """

    def __init__(self, stop_after_steps=0):
        """Stop after ``stop_after_steps`` steps of this run (0: only on a signal)."""
        self.stop_after_steps = stop_after_steps
        self.steps_done = 0
        self.signal_number = 0
        self.reason = ''
        self._previous_handlers = {}

    def _handle(self, signal_number, frame):
        if self.signal_number:
            self._restore_handlers()
            raise KeyboardInterrupt
        self.signal_number = signal_number
        LOGGER.warning('%s received: saving a checkpoint after this step, then stopping '
                       '(send it again to stop at once, without saving)',
                       signal.Signals(signal_number).name)

    def _restore_handlers(self):
        for signal_number, handler in self._previous_handlers.items():
            signal.signal(signal_number, handler)
        self._previous_handlers = {}

    def on_train_begin(self, args, state, control, **kwargs):
        """Install the handlers (only possible from the main thread)."""
        try:
            for signal_number in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signal_number] = signal.signal(signal_number,
                                                                       self._handle)
        except ValueError:
            LOGGER.warning('not in the main thread: SIGINT/SIGTERM will not save a checkpoint')

    def on_step_end(self, args, state, control, **kwargs):
        """Ask the Trainer to save and stop when a signal came or the step budget is spent."""
        self.steps_done += 1
        wanted = torch.tensor(
            [self.signal_number,
             int(bool(self.stop_after_steps) and self.steps_done >= self.stop_after_steps)],
            device=args.device if args.device.type == 'cuda' else 'cpu')
        if is_distributed():
            # All ranks must stop at the same step, or the next collective hangs.
            torch.distributed.all_reduce(wanted, op=torch.distributed.ReduceOp.MAX)
        signal_number, budget_spent = (int(value) for value in wanted.tolist())
        if not (signal_number or budget_spent) or self.reason:
            return control
        if state.global_step >= state.max_steps:
            # The run ends at this step anyway (its checkpoint and evaluation included); a stop
            # here would only skip saving the model, and the Trainer resumes a checkpoint of the
            # last step by training one step past the schedule.
            if signal_number:
                LOGGER.warning('%s came in the last step: finishing the run and saving the '
                               'model', signal.Signals(signal_number).name)
            return control
        self.signal_number = self.signal_number or signal_number
        self.reason = (signal.Signals(signal_number).name if signal_number
                       else f'--stop_after_steps {self.stop_after_steps}')
        control.should_save = True
        control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Give SIGINT/SIGTERM back to their previous handlers."""
        self._restore_handlers()
