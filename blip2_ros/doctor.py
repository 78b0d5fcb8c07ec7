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
Check this machine for what the caption node and the training tools need, on one screen.

Each line starts with OK, WARN or MISSING, says what was found and, where something is wrong,
how to fix it. MISSING is kept for what the caption node cannot run without (Python, numpy,
OpenCV, Pillow, torch, transformers, rclpy, the message packages, and the model named with
``--model``); the exit status is 1 when anything is MISSING, else 0. Optional things (a GPU,
what torch_compile needs, cv_bridge, peft, the training tools, Java for METEOR) are WARN when
absent.

A named model is looked up without loading its weights: a local folder, or a hub id in the local
Hugging Face cache; only when the cache lacks it and the machine is online is its config.json
fetched. Of its weight files only the safetensors headers are read, which is where a truncated
file fails. The parameter count comes from building the model on torch's meta device.

Usage: ``python -m blip2_ros.doctor [--model M] [--local-files-only] [--cache-dir DIR]``
(also ``ros2 run blip2_ros doctor``).
"""

import argparse
from dataclasses import dataclass
import importlib
from importlib import metadata
import os
import shutil
import subprocess
import sys

from blip2_ros.checkpoint import (config_problem, lacks_processor_files, model_location,
                                  one_line, TRUST_REMOTE_CODE_HINT, weight_kind,
                                  weight_problem)

OK, WARN, MISSING = 'OK', 'WARN', 'MISSING'
MESSAGE_PACKAGES = (('sensor_msgs.msg', 'Image'), ('sensor_msgs.msg', 'CompressedImage'),
                    ('std_msgs.msg', 'String'), ('std_srvs.srv', 'SetBool'),
                    ('std_srvs.srv', 'Trigger'), ('diagnostic_msgs.msg', 'DiagnosticArray'),
                    ('rcl_interfaces.msg', 'ParameterDescriptor'))
# Weights of a model in each dtype, in bytes per parameter.
BYTES_PER_PARAMETER = {'float32': 4, 'bfloat16': 2, 'float16': 2}
# Activations, CUDA context and the KV cache come on top of the weights.
HEADROOM = 1.2
GIB = 1024 ** 3


@dataclass
class Check:
    """One line of the report."""

    status: str
    what: str
    fix: str = ''

    def line(self):
        """Return the report line: status, what was found and, if any, the fix."""
        text = f'{self.status:<8}{self.what}'
        return f'{text} -> {self.fix}' if self.fix else text


def _version(distribution, module=None):
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return getattr(module, '__version__', 'unknown version')


def check_python():
    """Python 3.10 or newer (what transformers 5 and ROS 2 Humble and later use)."""
    version = '.'.join(str(part) for part in sys.version_info[:3])
    if sys.version_info < (3, 10):
        return Check(MISSING, f'Python {version} is too old',
                     'use Python 3.10 or newer (3.11 for the ROS 2 wheels from PyPI)')
    return Check(OK, f'Python {version} ({sys.executable})')


def check_module(name, distribution, purpose, fix, required=True):
    """Import ``name`` and report its version; MISSING (or WARN if optional) when it fails."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # a broken install fails with anything, not only ImportError
        return Check(MISSING if required else WARN,
                     f'{distribution} not importable ({one_line(error, 160)}): {purpose}', fix)
    return Check(OK, f'{distribution} {_version(distribution, module)} ({purpose})')


def check_cuda():
    """Whether torch can use a CUDA GPU, with name, memory and bf16 support per device."""
    try:
        import torch
    except Exception:
        return [Check(WARN, 'CUDA: not checked, torch is missing')]
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            reason = f'torch {torch.__version__} is a CPU-only build'
            fix = ('captions run on the CPU, slowly for full-size models; for a GPU install a '
                   'CUDA build of torch that matches the NVIDIA driver')
        else:
            reason = f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU'
            fix = ('check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; until then '
                   'captions run on the CPU')
        return [Check(WARN, f'CUDA: not usable: {reason}', fix)]
    checks = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        bf16 = 'bf16' if native_bf16 else 'no bf16 (float16 is used)'
        checks.append(Check(OK, f'CUDA GPU {index}: {properties.name}, '
                                f'{properties.total_memory / GIB:.1f} GiB, compute capability '
                                f'{properties.major}.{properties.minor}, {bf16} '
                                f'(torch CUDA {torch.version.cuda})'))
    return checks


def _nearest_existing(path):
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_torch_compile():
    """Check what torch_compile needs: a compiler, and a folder to keep compiled code in."""
    try:
        import torch
        from blip2_ros.decode import compile_cache_folder
    except Exception:
        return [Check(WARN, 'torch_compile: not checked, torch is missing')]
    checks = []
    if torch.cuda.is_available():
        # Triton builds a small C launcher with the host compiler.
        names, kind, fix = ('cc', 'gcc', 'clang'), 'C compiler', 'apt install gcc'
    else:
        names, kind, fix = ('c++', 'g++', 'clang++'), 'C++ compiler', 'apt install g++'
    compiler = next(filter(None, map(shutil.which, names)), None)
    if compiler is None:
        checks.append(Check(WARN, f'torch_compile: no {kind} found ({", ".join(names)})',
                            f'{fix}; without one the node logs why and decodes uncompiled'))
    folder = compile_cache_folder()
    existing = _nearest_existing(folder)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        checks.append(Check(
            WARN, f'torch_compile: cannot write {folder}: every start compiles again',
            'set TORCHINDUCTOR_CACHE_DIR to a folder that is writable and kept across reboots'))
    if not checks:
        checks.append(Check(OK, f'torch_compile: {kind} {compiler}; compiled code kept in '
                                f'{folder}'))
    return checks


def check_rclpy():
    """Whether rclpy imports, its version, and which RMW implementation it uses."""
    try:
        import rclpy
        from rclpy.utilities import get_rmw_implementation_identifier
        rmw = get_rmw_implementation_identifier()
    except Exception as error:
        return Check(MISSING, f'rclpy not importable ({one_line(error, 160)}): the node needs it',
                     'source your ROS 2 setup (source /opt/ros/<distro>/setup.bash) or install '
                     'the ROS 2 wheels: pip install -r requirements.txt')
    requested = os.environ.get('RMW_IMPLEMENTATION', '')
    source = f'RMW_IMPLEMENTATION={requested}' if requested else 'RMW_IMPLEMENTATION unset'
    distro = os.environ.get('ROS_DISTRO', '')
    domain = os.environ.get('ROS_DOMAIN_ID', '0')
    discovery = os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE', 'SUBNET (default)')
    what = (f'rclpy {_version("rclpy", rclpy)}{f" (ROS {distro})" if distro else ""}, RMW {rmw} '
            f'({source}), ROS_DOMAIN_ID {domain}, discovery {discovery}')
    if requested and requested != rmw:
        return Check(WARN, what, f'{requested} was asked for but {rmw} is in use: install it')
    return Check(OK, what)


def check_messages():
    """Whether the message and service packages import, their C type support included."""
    missing = []
    for module_name, type_name in MESSAGE_PACKAGES:
        try:
            message_type = getattr(importlib.import_module(module_name), type_name)
            # Loads the compiled type support, which is what fails on a half-installed ROS.
            type(message_type).__import_type_support__()
        except Exception as error:
            missing.append(f'{module_name}.{type_name} ({one_line(error, 160)})')
    packages = sorted({name.split('.')[0] for name, _ in MESSAGE_PACKAGES})
    if missing:
        return Check(MISSING, f'message packages: cannot load {", ".join(missing)}',
                     'install them with your ROS 2 (apt install ros-<distro>-<package>) or '
                     'pip install -r requirements.txt')
    return Check(OK, f'message packages {", ".join(packages)}')


def check_cv_bridge():
    """cv_bridge is optional: the node converts images itself where it is absent."""
    # Decided the way the node decides, so PyPI's broken ROS 1 port is never imported here.
    from blip2_ros.image_conversion import cv_bridge_failure, cv_bridge_in_use
    if cv_bridge_in_use():
        return Check(OK, 'cv_bridge from the ROS 2 install converts raw images')
    failure = cv_bridge_failure()
    if failure is not None:
        import numpy
        what = (f'cv_bridge from the ROS 2 install does not load ({one_line(failure, 160)}): the '
                'node converts images with blip2_ros.image_conversion instead')
        if int(numpy.__version__.split('.')[0]) >= 2:
            return Check(WARN, what, f'numpy {numpy.__version__} is first on the path, and the '
                         "distribution's cv_bridge is built for its numpy 1.x: pip uninstall "
                         "numpy opencv-python-headless in this environment, so that apt's are "
                         'used (README: On a robot with ROS 2)')
        return Check(WARN, what, 'reinstall it: apt install --reinstall ros-<distro>-cv-bridge')
    return Check(WARN, 'no ROS 2 cv_bridge: the node converts images with '
                       'blip2_ros.image_conversion (numpy/OpenCV, same encodings) instead',
                 'nothing needed; on a ROS 2 install, apt install ros-<distro>-cv-bridge '
                 'adds it (the PyPI package named cv-bridge is a ROS 1 port: do not use it)')


def check_java():
    """Java runs METEOR and the PTB tokenizer of the caption evaluator."""
    java = shutil.which('java')
    if java is None:
        return Check(WARN, 'Java not found: the evaluator cannot compute METEOR',
                     'apt install default-jre-headless (BLEU, ROUGE-L and CIDEr work without it)')
    try:
        result = subprocess.run([java, '-version'], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as error:
        return Check(WARN, f'Java at {java} does not run ({one_line(error, 160)})',
                     'reinstall Java (apt install default-jre-headless)')
    first_line = (result.stderr or result.stdout).strip().splitlines()
    if result.returncode != 0 or not first_line:
        return Check(WARN, f'Java at {java} failed (exit {result.returncode})',
                     'reinstall Java (apt install default-jre-headless)')
    return Check(OK, f'Java: {first_line[0]} (METEOR)')


def _locate_hub_model(model, cache_dir, local_files_only):
    """
    Find a hub model in the local cache; return (snapshot folder, source, problem).

    ``source`` is 'cache' or 'download' (only the config was fetched); ``problem`` is a Check
    when the model cannot be used as it is.
    """
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(model, 'config.json', cache_dir=cache_dir)
    if isinstance(config, str):
        return os.path.dirname(config), 'cache', None
    offline = os.environ.get('HF_HUB_OFFLINE', '') not in ('', '0', 'false', 'False')
    fix = (f'on a machine with internet run `hf download {model}` and copy its Hugging Face '
           'cache (~/.cache/huggingface) here, or save the model to a folder and name that')
    if local_files_only or offline:
        why = '--local-files-only' if local_files_only else 'HF_HUB_OFFLINE is set'
        return None, '', Check(MISSING, f"model '{model}' is not in the local Hugging Face "
                                        f'cache ({why})', fix)
    try:
        from huggingface_hub import hf_hub_download
        config = hf_hub_download(model, 'config.json', cache_dir=cache_dir)
    except Exception as error:
        return None, '', Check(MISSING, f"model '{model}' is not in the local cache and its "
                                        f'config cannot be fetched ({one_line(error, 160)})', fix)
    return os.path.dirname(config), 'download', None


def count_parameters(config):
    """Count a BLIP-2's parameters by building it on the meta device (no memory, no weights)."""
    import torch
    from transformers import Blip2ForConditionalGeneration
    with torch.device('meta'):
        model = Blip2ForConditionalGeneration(config)
    return sum(parameter.numel() for parameter in model.parameters())


def _memory_line(parameters):
    sizes = {}
    for dtype, size in BYTES_PER_PARAMETER.items():
        sizes.setdefault(size, []).append(dtype)
    parts = [f'{"/".join(dtypes)} {parameters * size / GIB:.2f} GiB'
             for size, dtypes in sorted(sizes.items(), reverse=True)]
    return f'weights need {", ".join(parts)} (about {HEADROOM:.1f}x that to run)'


def _fits(parameters):
    """Return a WARN Check when the model will not fit where the node would put it, else None."""
    try:
        import torch
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            dtype = 'bfloat16' if native_bf16 else 'float16'
            where = f'GPU 0 ({total / GIB:.1f} GiB)'
        else:
            total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
            dtype, where = 'float32', f'RAM ({total / GIB:.1f} GiB, CPU inference)'
    except (ImportError, ValueError, OSError, AttributeError):
        return None
    need = parameters * BYTES_PER_PARAMETER[dtype] * HEADROOM
    if need > total:
        return Check(WARN, f'the model needs about {need / GIB:.1f} GiB as {dtype}, more than '
                           f'{where}', 'use a smaller checkpoint or a machine with more memory')
    return None


def _find_model(model, local_files_only, cache_dir):
    """Return (folder, source, files) for a model name, or a MISSING Check that says why not."""
    location, kind = model_location(model)
    if kind == 'folder':
        return location, 'folder', set(os.listdir(location))
    if kind == 'file':
        return Check(MISSING, f"model '{model}' is a file, not a folder",
                     'give the folder save_pretrained wrote (config.json, weights, processor '
                     'files) or a hub id such as Salesforce/blip2-opt-2.7b')
    if kind == 'missing':
        return Check(MISSING, f"model folder '{model}' does not exist",
                     'give a folder written by save_pretrained (config.json, weights, '
                     'processor files) or a hub id such as Salesforce/blip2-opt-2.7b')
    try:
        folder, source, problem = _locate_hub_model(model, cache_dir, local_files_only)
    except Exception as error:
        return Check(MISSING, f"model '{model}' cannot be looked up ({one_line(error, 160)})",
                     'give a local folder, or check the model id')
    return problem or (folder, source, set(os.listdir(folder)))


def _read_config(model, folder, where):
    """Return the BLIP-2 config in ``folder``, or a MISSING Check that says why it is none."""
    try:
        from transformers import AutoConfig, PretrainedConfig
        config_dict, _ = PretrainedConfig.get_config_dict(folder, local_files_only=True)
        # Code of its own is an opt-in, not a fault: check_model warns of it.
        problem = config_problem(config_dict, trust_remote_code=True)
        if problem:
            return Check(MISSING, f"model '{model}' ({where}): {problem}")
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:
        return Check(MISSING, f"model '{model}' has an unreadable config "
                              f'({one_line(error, 160)})',
                     'give a folder written by save_pretrained')


def _files_checks(model, folder, source, files, where):
    """Check a checkpoint's weights and processor files as the loader does, before loading."""
    # Weights of a model not yet downloaded are unknown; the load itself will tell.
    if source == 'download':
        return []
    if not weight_kind(files):
        return [Check(MISSING, f"model '{model}' ({where}) has a config but no complete weights",
                      'download or save the whole checkpoint (model*.safetensors)')]
    problem = weight_problem(folder, files)
    if problem:
        return [Check(MISSING, f"model '{model}' ({where}): {problem}",
                      'download or save the whole checkpoint again')]
    checks = []
    if weight_kind(files) == 'pickle':
        checks.append(Check(WARN, f"model '{model}' has only pickle weights (pytorch_model.bin)",
                            'set allow_pickle:=true if you trust it, or convert to safetensors'))
    if lacks_processor_files(files):
        checks.append(Check(MISSING, f"model '{model}' ({where}) lacks its processor files "
                                     '(preprocessor_config.json, tokenizer files)',
                            'save the Blip2Processor next to the model (save_pretrained)'))
    return checks


def check_model(model, local_files_only=False, cache_dir=None):
    """Whether ``model`` (folder or hub id) can be loaded, and how much memory it needs."""
    found = _find_model(model, local_files_only, cache_dir)
    if isinstance(found, Check):
        return [found]
    folder, source, files = found
    where = {'folder': 'local folder', 'cache': 'in the local Hugging Face cache',
             'download': 'not cached yet: only its config was fetched'}[source]
    if 'config.json' not in files:
        return [Check(MISSING, f"model '{model}' ({where}) has no config.json",
                      'give the folder that save_pretrained wrote')]
    config = _read_config(model, folder, where)
    if isinstance(config, Check):
        return [config]
    checks = _files_checks(model, folder, source, files, where)
    if getattr(config, 'auto_map', None):
        checks.append(Check(WARN, f"model '{model}' names code of its own in its config.json "
                                  '(auto_map), which runs only when trusted',
                            TRUST_REMOTE_CODE_HINT))
    if any(check.status == MISSING for check in checks):
        return checks
    text_model = getattr(config.text_config, 'model_type', '?')
    try:
        parameters = count_parameters(config)
    except Exception as error:
        checks.append(Check(OK, f"model '{model}' ({where}): BLIP-2 with {text_model}; "
                                f'parameter count unknown ({one_line(error, 160)})'))
        return checks
    status = WARN if source == 'download' else OK
    checks.insert(0, Check(status, f"model '{model}' ({where}): BLIP-2 with {text_model}, "
                                   f'{parameters / 1e6:,.1f}M parameters; '
                                   f'{_memory_line(parameters)}',
                           'the node downloads it at start; robots offline need it cached'
                           if status == WARN else ''))
    fits = _fits(parameters)
    if fits is not None:
        checks.append(fits)
    return checks


def run_checks(model='', local_files_only=False, cache_dir=None):
    """Run every check; return the list of Check lines in report order."""
    checks = [check_python()]
    checks.append(check_module('numpy', 'numpy', 'arrays', 'pip install numpy'))
    checks.append(check_module('cv2', 'opencv-python-headless', 'image conversion, JPEG',
                               'pip install opencv-python-headless (or apt install '
                               'python3-opencv)'))
    checks.append(check_module('PIL', 'pillow', 'image files, PNG decoding',
                               'pip install pillow'))
    torch_check = check_module('torch', 'torch', 'inference', 'pip install torch')
    checks.append(torch_check)
    checks.extend(check_cuda())
    checks.extend(check_torch_compile())
    checks.append(check_module('transformers', 'transformers', 'BLIP-2 models',
                               'pip install -r requirements-ml.txt'))
    checks.append(check_module('peft', 'peft', 'LoRA adapters and fine-tuning',
                               'pip install peft (only needed for adapters and training)',
                               required=False))
    checks.append(check_rclpy())
    checks.append(check_messages())
    checks.append(check_cv_bridge())
    for module, distribution, purpose in (
            ('rosbags', 'rosbags', 'bag conversion, training only'),
            ('pycocoevalcap', 'pycocoevalcap', 'caption metrics, training only'),
            ('tensorboard', 'tensorboard', 'training curves, training only')):
        checks.append(check_module(module, distribution, purpose,
                                   'pip install -r requirements-ml.txt', required=False))
    checks.append(check_java())
    if model:
        checks.extend(check_model(model, local_files_only, cache_dir))
    return checks


def parse_args(argv=None):
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description='Check this machine for what the blip2_ros caption node and training need.')
    parser.add_argument('--model', default='', help='also check that this BLIP-2 model (hub id '
                        'or local folder) can be loaded, and how much memory it needs')
    parser.add_argument('--local-files-only', action='store_true',
                        help='look for the model in the local cache only, as an offline robot')
    parser.add_argument('--cache-dir', default=None,
                        help='Hugging Face hub cache to look in (default: the standard one)')
    return parser.parse_args(argv)


def main(argv=None):
    """Print the report; return 1 when something the caption node needs is missing, else 0."""
    args = parse_args(argv)
    checks = run_checks(args.model, args.local_files_only, args.cache_dir)
    print('blip2_ros doctor')
    for check in checks:
        print(check.line())
    missing = [check for check in checks if check.status == MISSING]
    warnings = sum(check.status == WARN for check in checks)
    if missing:
        print(f'{len(missing)} missing, {warnings} warning(s): the caption node cannot run here '
              'until the MISSING lines are fixed')
        return 1
    print(f'everything the caption node needs is here ({warnings} warning(s))')
    return 0


if __name__ == '__main__':
    sys.exit(main())
