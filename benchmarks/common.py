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
Helpers shared by the benchmark scripts: statistics, tables, JSON, machine facts.

The scripts run as ``python benchmarks/bench_X.py`` from a source checkout, so importing this
module also puts the repository root on ``sys.path`` (the ``blip2_ros`` and ``training``
packages need not be installed).
"""

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def argument_parser(description, quick_help):
    """Return an ArgumentParser with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--quick', action='store_true', help=quick_help)
    parser.add_argument('--json', metavar='OUT', default=None,
                        help='write the results as JSON to this file (default: print them)')
    return parser


def add_omp_wait_policy_argument(parser):
    """Add --omp-wait-policy: how the benchmark starts its caption node processes."""
    parser.add_argument('--omp-wait-policy', choices=('PASSIVE', 'ACTIVE', 'unset'),
                        default='PASSIVE',
                        help='OMP_WAIT_POLICY for the caption nodes (default PASSIVE, as '
                             'caption.launch.py sets it; unset: idle OpenMP threads spin a '
                             'while before they sleep)')


def set_omp_wait_policy(policy):
    """Start child processes from now on with OMP_WAIT_POLICY ``policy`` ('unset': without)."""
    os.environ.pop('OMP_WAIT_POLICY', None)
    if policy != 'unset':
        os.environ['OMP_WAIT_POLICY'] = policy


def summary(values):
    """Return count, mean, p50, p95, min and max of ``values`` (milliseconds or any unit)."""
    values = [float(value) for value in values]
    if not values:
        return {'n': 0, 'mean': None, 'p50': None, 'p95': None, 'min': None, 'max': None}
    array = np.asarray(values)
    return {'n': len(values), 'mean': float(array.mean()),
            'p50': float(np.percentile(array, 50)), 'p95': float(np.percentile(array, 95)),
            'min': float(array.min()), 'max': float(array.max())}


def time_calls(function, repeats, warmup=2, synchronize=None):
    """Call ``function`` ``warmup`` + ``repeats`` times; return the timed calls in milliseconds."""
    for _ in range(warmup):
        function()
    if synchronize:
        synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if synchronize:
            synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def format_value(value, digits=2):
    """Format a table cell: numbers with ``digits`` decimals, None as '-'."""
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


def table(rows, columns, digits=2):
    """Render ``rows`` (dicts) as a Markdown table of ``columns`` (key or (key, title) pairs)."""
    columns = [column if isinstance(column, tuple) else (column, column) for column in columns]
    header = '| ' + ' | '.join(title for _, title in columns) + ' |'
    rule = '|' + '|'.join('---' for _ in columns) + '|'
    lines = [header, rule]
    for row in rows:
        cells = [format_value(row.get(key), digits) for key, _ in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def package_version(name):
    """Return an installed distribution's version, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info():
    """Describe the machine and the library versions a result depends on."""
    info = {
        'machine': platform.machine(),
        'cpu_cores': os.cpu_count(),
        'python': platform.python_version(),
        'numpy': np.__version__,
        'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', 'unset'),
    }
    for name in ('torch', 'transformers', 'rclpy', 'opencv-python-headless', 'pillow', 'peft'):
        version = package_version(name)
        if version:
            info[name] = version
    try:
        import torch
        info['torch_threads'] = torch.get_num_threads()
        if torch.cuda.is_available():
            info['gpu'] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def goal(name, met, detail):
    """Record one goal: what it asks, whether it was met, and the numbers behind the verdict."""
    return {'goal': name, 'met': bool(met), 'detail': detail}


def goals_table(goals):
    """Render goals as a Markdown table."""
    rows = [{'goal': item['goal'], 'met': 'MET' if item['met'] else 'MISSED',
             'detail': item['detail']} for item in goals]
    return table(rows, ['goal', 'met', 'detail'])


def finish(results, json_path):
    """Write the results as JSON to ``json_path`` (or stdout); return the exit code 0."""
    text = json.dumps(results, indent=2, sort_keys=False, default=str)
    if json_path:
        folder = os.path.dirname(os.path.abspath(json_path))
        os.makedirs(folder, exist_ok=True)
        with open(json_path, 'w') as stream:
            stream.write(text + '\n')
        print(f'\nJSON written to {json_path}')
    else:
        print('\nJSON:')
        print(text)
    return 0


def quiet_libraries():
    """Silence progress bars and advisory warnings that would bury the tables."""
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
    try:
        from transformers.utils import logging as transformers_logging
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
