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
Reading ROS 1 and ROS 2 bags without a ROS install, with the pure-Python ``rosbags`` library.

:class:`BagFile` opens rosbag2 folders (sqlite3 or mcap, with metadata.yaml), bare ``.db3`` /
``.mcap`` storage files (also the 2019 layout without metadata.yaml) and ROS 1 ``.bag`` files;
the kind is told from the file's first bytes, not its name. It lists topics, yields raw
messages in time order and deserializes them with the bag's own message definitions where it
has them. Every problem is a :class:`ConversionError` with one line for the user.
"""

from pathlib import Path

from blip2_ros.checkpoint import one_line
from rosbags.interfaces import MessageDefinitionFormat
from rosbags.rosbag1 import Reader as Rosbag1Reader
from rosbags.rosbag2 import Reader as Rosbag2Reader
from rosbags.typesys import get_types_from_msg, get_typestore, Stores

_ROS1_MAGIC = b'#ROSBAG V2.0'
_SQLITE_MAGIC = b'SQLite format 3\x00'
_MCAP_MAGIC = b'\x89MCAP0\r\n'


class ConversionError(Exception):
    """A problem with a bag conversion's input or output that stops it; one line for the user."""


def _normalise_type(msgtype):
    """Return 'pkg/msg/Type' for the 2019-era 'pkg/Type' spelling too."""
    parts = msgtype.split('/')
    if len(parts) == 2:
        return f'{parts[0]}/msg/{parts[1]}'
    return msgtype


_DEFAULT_ROS2_TYPESTORE = []


def _default_ros2_typestore():
    if not _DEFAULT_ROS2_TYPESTORE:
        _DEFAULT_ROS2_TYPESTORE.append(get_typestore(Stores.LATEST))
    return _DEFAULT_ROS2_TYPESTORE[0]


class BagFile:
    """One bag opened with rosbags: its topics, time-ordered raw messages, and deserializer."""

    def __init__(self, path):
        """Remember the path; nothing is read until ``open_reader``."""
        self.path = Path(path)
        # Resolved, so that '.' or 'shift1/..' name the bag, not '' or '..'.
        self.name = self.path.resolve().name
        self.kind = ''
        self.is_ros1 = False
        self.topics = {}
        self._reader = None
        self._connections = {}
        self._typestores = {}

    def __enter__(self):
        """Open the bag."""
        self.open_reader()
        return self

    def __exit__(self, *exc_info):
        """Close the bag."""
        self.close()

    def _fail(self, message):
        return ConversionError(f'{self.path}: {message}')

    def _make_reader(self):
        path = self.path
        if not path.exists():
            raise self._fail('no such bag file or folder')
        if path.is_dir():
            if (path / 'metadata.yaml').is_file():
                self.kind = 'rosbag2 folder'
                return Rosbag2Reader(path)
            storage = self._storage_file()
            hint = (f'; to read its storage file without metadata, pass {storage}'
                    if storage else '')
            raise self._fail(f'folder has no metadata.yaml, so it is not a rosbag2 bag{hint}')
        try:
            with open(path, 'rb') as stream:
                head = stream.read(16)
        except OSError as error:
            raise self._fail(f'cannot read: {one_line(error, 240)}') from None
        if not head:
            raise self._fail('file is empty')
        if head.startswith(_ROS1_MAGIC):
            self.kind = 'ROS 1 bag'
            self.is_ros1 = True
            return Rosbag1Reader(path)
        if head.startswith(b'#ROSBAG V'):
            version = head.split(b'\n')[0].decode('ascii', 'replace')
            raise self._fail(f"'{version}' is not supported: only ROS 1 bag format V2.0 is")
        for magic, suffix, kind in ((_SQLITE_MAGIC, '.db3', 'rosbag2 sqlite3 file'),
                                    (_MCAP_MAGIC, '.mcap', 'rosbag2 mcap file')):
            if head.startswith(magic):
                if path.suffix != suffix:
                    raise self._fail(f'this is a {kind}; its name must end in {suffix}')
                self.kind = kind
                return Rosbag2Reader(path)
        raise self._fail('not a ROS bag: expected a ROS 1 .bag, a .db3 or .mcap file, '
                         'or a rosbag2 folder with metadata.yaml')

    def _storage_file(self):
        """Return the first storage file of a rosbag2 folder, or None."""
        storage = sorted(p.name for p in self.path.iterdir() if p.suffix in ('.db3', '.mcap'))
        return self.path / storage[0] if storage else None

    def open_reader(self):
        """Open the bag and list its topics; raise ConversionError if it cannot be read."""
        reader = self._make_reader()
        try:
            reader.open()
        except ConversionError:
            raise
        except Exception as error:
            text = str(error).lower()
            hint = ''
            if self.is_ros1 and 'index' in text:
                hint = ' (a recording cut short has no index; `rosbag reindex` can repair it)'
            elif 'magic' in text:
                hint = ' (the file is truncated: was the recording stopped cleanly?)'
            raise self._fail(f'cannot open {self.kind}: {one_line(error, 240)}{hint}') from None
        self._reader = reader
        try:
            for connection in reader.connections:
                topic = connection.topic
                self.topics.setdefault(topic, _normalise_type(connection.msgtype))
                self._connections.setdefault(topic, []).append(connection)
        except Exception as error:
            self.close()
            raise self._fail(f'cannot list topics: {one_line(error, 240)}') from None

    def close(self):
        """Close the reader if it is open."""
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # noqa: B902 - closing a damaged bag must not hide the first error
                pass

    def topics_of_types(self, types):
        """Return the sorted topics whose type is one of ``types``."""
        return sorted(topic for topic, msgtype in self.topics.items() if msgtype in types)

    def message_count(self, topics):
        """Return how many messages the bag's index lists on ``topics``."""
        return sum(c.msgcount for topic in topics for c in self._connections.get(topic, ()))

    def check_all_read(self, read_per_topic):
        """
        Compare the messages read per topic with the counts the bag's index lists.

        rosbags finds a rosbag2 folder's messages by the topic name and type in metadata.yaml,
        so an edited metadata.yaml makes a topic silently empty: raise ConversionError when the
        index lists messages on a topic and none were read. Return notes for other differences.
        """
        notes = []
        for topic, read in read_per_topic.items():
            listed = self.message_count([topic])
            if listed and not read:
                storage = self._storage_file() if self.path.is_dir() else None
                hint = f', or pass {storage} to read it without metadata.yaml' if storage else ''
                raise self._fail(
                    f'metadata.yaml and the storage file disagree: metadata.yaml lists {listed} '
                    f'messages on {topic} ({self.topics[topic]}), the storage file has none '
                    f'under that name and type; restore the original metadata.yaml{hint}')
            if read != listed:
                notes.append(f'{self.name}: the index lists {listed} messages on {topic}, '
                             f'{read} were read')
        return notes

    def messages(self, topics):
        """Yield ``(connection, time_ns, rawdata)`` on ``topics`` in time order."""
        connections = [c for topic in topics for c in self._connections.get(topic, ())]
        if not connections:
            return
        iterator = self._reader.messages(connections=connections)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                raise self._fail(
                    f'the bag is damaged or truncated: {one_line(error, 240)}') from None
            yield item

    def _typestore(self, connection):
        msgdef = connection.msgdef
        if msgdef.format != MessageDefinitionFormat.MSG:
            if self.is_ros1:
                raise self._fail(f'{connection.topic} has no message definition')
            # Image, CompressedImage and String are the same in every ROS 2 release, so
            # the built-in definitions serve bags without (or with IDL) definitions.
            return _default_ros2_typestore()
        key = (msgdef.data, connection.msgtype)
        typestore = self._typestores.get(key)
        if typestore is None:
            # ROS 1 definitions differ from ROS 2 ones (Header has a seq): use the bag's own.
            typestore = get_typestore(Stores.EMPTY)
            msgtype = _normalise_type(connection.msgtype)
            typestore.register(get_types_from_msg(msgdef.data, msgtype))
            self._typestores[key] = typestore
        return typestore

    def deserialize(self, connection, rawdata, time_ns):
        """Return the message object; raise ConversionError if the bytes do not decode."""
        msgtype = _normalise_type(connection.msgtype)
        try:
            typestore = self._typestore(connection)
            if self.is_ros1:
                return typestore.deserialize_ros1(rawdata, msgtype)
            return typestore.deserialize_cdr(rawdata, msgtype)
        except ConversionError:
            raise
        except Exception as error:
            raise self._fail(
                f'the {msgtype} message on {connection.topic} at {time_ns} ns cannot be '
                f'deserialized ({one_line(error, 240)}); the bag is damaged') from None
