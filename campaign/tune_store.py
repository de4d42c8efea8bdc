"""Tune's view of a campaign on an object store: the same filesystem, minus requests that
can only miss. The campaign writes no per-trial metrics files (its results are the part
files), yet Tune looks up ``result.json`` and ``progress.csv`` of every trial when a run
ends, one request after another, and marks every trial folder with an empty object. On an
object store folders are implicit, so neither lookup nor marker changes what is stored."""
from __future__ import annotations

import posixpath

import pyarrow.fs as pafs

METRICS_FILES = ("result.json", "progress.csv")  # what Tune's end-of-run analysis looks for


class TuneStoreView(pafs.FileSystemHandler):
    """Delegates every call to ``fs``, except: a metrics file is 'not found' without a
    request, and creating a folder is a no-op (objects imply their folders)."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs

    def __reduce__(self):  # Tune ships its storage filesystem to the trial actors
        return TuneStoreView, (self.fs,)

    def __eq__(self, other) -> bool:
        return isinstance(other, TuneStoreView) and self.fs.equals(other.fs)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"tune-view+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        infos = {}
        asked = [p for p in paths if posixpath.basename(p) not in METRICS_FILES]
        for path, info in zip(asked, self.fs.get_file_info(asked) if asked else []):
            infos[path] = info
        return [infos.get(p) or pafs.FileInfo(p, pafs.FileType.NotFound) for p in paths]

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        pass

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def tune_view(fs: pafs.FileSystem) -> pafs.FileSystem:
    """``fs`` as Tune should use it for a campaign's experiment folder."""
    return pafs.PyFileSystem(TuneStoreView(fs))
