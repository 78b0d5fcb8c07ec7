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
Merge a LoRA adapter into its base BLIP-2 and save the whole model, for servers such as vLLM.

    python -m training.export_merged --adapter OUT --output MERGED [--base BASE]
        [--dtype float32|bfloat16|float16]

``training.train --method lora`` saves only the adapter (unless run with --merge_lora), which
the project's captioner applies at load time; vLLM (scripts/serve_vllm.py) needs one folder
with the whole model. BASE defaults to the base model the training run recorded. The merge
is the captioner's own, so the merged model captions as base plus adapter do; the training
prompt goes along.
"""

import argparse
import json
import os
import shutil
import sys

from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
from blip2_ros.checkpoint import DTYPES, ModelLoadError, TRAINING_INFO_FILE


def recorded_base_model(adapter):
    """Return the base model that training.train recorded next to the adapter, or ''."""
    path = os.path.join(adapter, TRAINING_INFO_FILE)
    if not os.path.isfile(path):
        return ''
    with open(path, encoding='utf-8') as stream:
        return json.load(stream).get('base_model', '')


def export_merged(adapter, output, base='', dtype='float32', trust_remote_code=False):
    """Write base + ``adapter`` merged into ``output`` with the processor; return ``output``."""
    from training.train import share_weight_files

    base = base or recorded_base_model(adapter)
    if not base:
        raise ModelLoadError(f'{adapter} does not say which base model it was trained on '
                             f'(no {TRAINING_INFO_FILE}): give --base')
    if os.path.abspath(output) == os.path.abspath(adapter):
        raise ModelLoadError('--output must be another folder than --adapter')
    captioner = Blip2Captioner(CaptionerConfig(model=base, adapter=adapter, device='cpu',
                                               dtype=dtype, trust_remote_code=trust_remote_code))
    os.makedirs(output, exist_ok=True)
    captioner.processor.save_pretrained(output)
    if os.path.isfile(os.path.join(adapter, TRAINING_INFO_FILE)):
        shutil.copyfile(os.path.join(adapter, TRAINING_INFO_FILE),
                        os.path.join(output, TRAINING_INFO_FILE))
    # Weights last, as training.train saves: a cut-off export never loads without its prompt.
    captioner.model.save_pretrained(output)
    share_weight_files(output)
    return output


def main(argv=None):
    """Command line: merge an adapter folder into a whole model folder."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--adapter', required=True, help='the output folder of a lora run')
    parser.add_argument('--output', required=True, help='folder for the merged model')
    parser.add_argument('--base', default='',
                        help='base model (hub id or folder); default: the one the run recorded')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32',
                        help='dtype of the saved weights')
    parser.add_argument('--trust_remote_code', '--trust-remote-code', action='store_true',
                        help="run the code the base's config.json names (auto_map); only for "
                             'checkpoints you trust')
    args = parser.parse_args(argv)
    try:
        output = export_merged(args.adapter, args.output, args.base, args.dtype,
                               args.trust_remote_code)
    except ModelLoadError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'saved the merged model to {output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
