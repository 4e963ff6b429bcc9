"""The only module of the pack that touches ComfyUI internals.

Nodes call these helpers for devices, files, progress and interrupts, and pass
the resulting plain callables into ``mpod_core`` (which never imports ComfyUI).
The denoiser adapters over MODEL / VAE / CLIP_VISION live in
:mod:`.diffusion` (imported by the nodes that need them, not here).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
import folder_paths

#: Input sub-folder that uploads of 3D files go to (shared with core Load 3D).
MESH_UPLOAD_SUBFOLDER = "3d"

#: Sub-folder of output (and input) that radiance fields are saved to by default and listed from.
FIELD_SUBFOLDER = "fields"


def torch_device() -> torch.device:
    """The device ComfyUI computes on (respects --cpu and friends)."""
    return comfy.model_management.get_torch_device()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


#: Cached listings: (root, recursive, extensions) -> (names, {directory: mtime_ns} it walked).
_listings: dict[tuple[str, bool, frozenset[str]], tuple[list[str], dict[str, int]]] = {}

#: A listing whose newest directory changed less than this long before the scan is not cached: a file
#: added in the same filesystem clock tick (a few ms on ext4) would not change the mtime again.
_RACY_NS = 2_000_000_000


def _scan(root: str, recursive: bool, exts: frozenset[str]) -> tuple[list[str], dict[str, int]]:
    """Files under ``root`` whose suffix is in ``exts`` (hidden names skipped), following links to
    files and folders (each real folder walked once, so a link loop ends), and the mtime of every
    folder walked."""
    found: list[str] = []
    dirs: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        folder = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs[folder] = st.st_mtime_ns
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:  # the suffix first: most entries of a big folder cost no stat at all
                if os.path.splitext(entry.name)[1].lower() in exts and entry.is_file():
                    found.append(name)
                elif recursive and entry.is_dir():
                    stack.append(name)
            except OSError:  # a dangling link or a file removed meanwhile
                continue
    return sorted(found), dirs


def _list_files(root: Path, extensions: Iterable[str], recursive: bool = True) -> list[str]:
    """Posix names relative to ``root`` of its files with one of ``extensions`` (all sub-folders when
    ``recursive``, else the top level only), sorted.

    Listings are cached and reused while no folder they walked has changed (its mtime), the rule
    ComfyUI's model-folder listings follow: a node's options are built on every ``/object_info`` and
    every prompt validation, and a folder of 10^5 images must not be read each time."""
    exts = frozenset(e.lower() for e in extensions)
    key = (os.path.abspath(root), recursive, exts)
    cached = _listings.get(key)
    if cached is not None and all(_mtime_ns(d) == t for d, t in cached[1].items()):
        return list(cached[0])
    started = time.time_ns()
    names, dirs = _scan(key[0], recursive, exts)
    if dirs and max(dirs.values()) < started - _RACY_NS:
        _listings[key] = (names, dirs)
    else:
        _listings.pop(key, None)
    return list(names)


def _mtime_ns(folder: str) -> Optional[int]:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _list_under(root: Path, extensions: Iterable[str], subfolders: Iterable[str]) -> list[str]:
    """Files anywhere under ``root/<subfolder>`` for each of ``subfolders``, named relative to ``root``."""
    names = []
    for sub in subfolders:
        sub = sub.strip("/")
        names += [f"{sub}/{name}" for name in _list_files(root / sub, extensions)]
    return names


def list_input_files(extensions: Iterable[str], subfolders: Iterable[str] = ()) -> list[str]:
    """Files with one of ``extensions`` at the top level of ComfyUI's input folder and anywhere under
    its ``subfolders`` (e.g. ``["3d"]``, where uploads of 3D files go), for a combo widget.

    Never a walk of the whole input folder (it may hold 10^5 images): files elsewhere in it are not
    listed, but :func:`resolve_input_file` accepts their names.

    Returns:
        Posix paths relative to the input folder, sorted.
    """
    extensions = list(extensions)
    root = input_directory()
    return sorted(set(_list_files(root, extensions, recursive=False)) | set(_list_under(root, extensions, subfolders)))


#: ComfyUI's annotation for a file named relative to the output folder (as Load Image uses it).
OUTPUT_ANNOTATION = " [output]"


def list_input_and_output_files(extensions: Iterable[str], subfolders: Iterable[str] = ()) -> list[str]:
    """:func:`list_input_files`, then the files under the output folder's ``subfolders`` annotated
    ``" [output]"``, so what a save node wrote there can be loaded back without moving it. The output
    folder's top level, where generated images pile up, is not listed."""
    extensions, subfolders = list(extensions), list(subfolders)
    outputs = sorted(set(_list_under(output_directory(), extensions, subfolders)))
    return list_input_files(extensions, subfolders) + [f"{name}{OUTPUT_ANNOTATION}" for name in outputs]


def _inside(root: Path, relative: str, what: str) -> Path:
    """``root/relative``, normalised but with links kept (as ComfyUI checks names): a file or folder
    linked in from elsewhere is inside; an absolute name or a ``..`` that leaves ``root`` is not.

    Raises:
        ValueError: the name is absolute, leaves ``root`` or names ``root`` itself.
    """
    root_str = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root_str, relative))
    if (os.path.isabs(relative) or os.path.splitdrive(relative)[0]
            or os.path.commonpath([root_str, path]) != root_str or path == root_str):
        raise ValueError(f"'{relative}' is outside ComfyUI's {what} folder")
    return Path(path)


def resolve_input_or_output_file(name: str) -> Path:
    """Absolute path of a name from :func:`list_input_and_output_files`.

    Raises:
        ValueError: empty, or leaving its folder.
    """
    if not name or not name.strip():
        raise ValueError("no file selected")
    if name.endswith(OUTPUT_ANNOTATION):
        return _inside(output_directory(), name[:-len(OUTPUT_ANNOTATION)], "output")
    return resolve_input_file(name)


def check_listed_file(node: str, name: str) -> bool | str:
    """A loader node's ``validate_inputs`` answer for a name from :func:`list_input_and_output_files`:
    True, or a message naming ``node`` when the name leaves its folder or the file is missing."""
    try:
        path = resolve_input_or_output_file(name)
    except ValueError as exc:
        return f"{node}: {exc}"
    if not path.is_file():
        return f"{node}: '{name}' not found"
    return True


def resolve_input_file(relative: str) -> Path:
    """Absolute path of a file named relative to the input folder.

    Raises:
        ValueError: the name is empty or leaves the input folder.
    """
    if not relative or not relative.strip():
        raise ValueError("no file selected: put a file in ComfyUI's input folder or upload one")
    return _inside(input_directory(), relative, "input")


def file_fingerprint(name: str, resolve: Callable[[str], Path]):
    """A loader's ``fingerprint_inputs`` value: re-run when the file on disk
    changes (mtime, size), not only when its name does."""
    try:
        stat = resolve(name).stat()
        return (name, stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError):
        return name


def output_directory() -> Path:
    return Path(folder_paths.get_output_directory())


def ensure_model_folder(folder_name: str) -> list[Path]:
    """Register ``models/<folder_name>`` with ComfyUI's ``folder_paths`` unless it is
    already there (other packs, or an ``extra_model_paths.yaml`` entry, may have
    registered the name; their folders are kept and searched first).

    Returns:
        The folders of that name, in search order.
    """
    default = os.path.join(folder_paths.models_dir, folder_name)
    if folder_name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[folder_name] = ([default], set(folder_paths.supported_pt_extensions))
    elif default not in folder_paths.get_folder_paths(folder_name):
        folder_paths.add_model_folder_path(folder_name, default)
    return [Path(p) for p in folder_paths.get_folder_paths(folder_name)]


def list_model_files(folder_name: str, extensions: Iterable[str]) -> list[str]:
    """Files with one of ``extensions`` in the model folders ``folder_name`` (registered on first use),
    as posix paths relative to their folder, sorted, for a combo widget.

    ComfyUI's own listing (``folder_paths.get_filename_list``): cached until a folder changes, and it
    follows linked files and folders, as its loaders do."""
    ensure_model_folder(folder_name)
    exts = {e.lower() for e in extensions}
    return sorted({name.replace(os.sep, "/") for name in folder_paths.get_filename_list(folder_name)
                   if os.path.splitext(name)[1].lower() in exts})


def resolve_model_file(folder_name: str, filename: str) -> Path:
    """Absolute path of ``filename`` (relative to one of the ``folder_name`` model folders).

    Raises:
        ValueError: empty, or leaving the folder.
        FileNotFoundError: in none of the folders; the message names the file and the folders.
    """
    return _find_in_model_folders(folder_name, filename, Path.is_file, "no file selected: put one in")


def _find_in_model_folders(folder_name: str, name: str, accept, nothing: str) -> Path:
    """The first ``root / name`` over the ``folder_name`` model folders that ``accept`` (a Path
    predicate) takes; ``nothing`` starts the message for an empty ``name``."""
    folders = ensure_model_folder(folder_name)
    if not name or not name.strip():
        raise ValueError(f"{nothing} {', '.join(map(str, folders))}")
    for root in folders:
        path = _inside(root, name, f"models/{folder_name}")
        if accept(path):
            return path
    raise FileNotFoundError(f"'{name}' not found in ComfyUI's models/{folder_name} folder "
                            f"({', '.join(map(str, folders))})")


def list_model_folders(folder_name: str, marker: str) -> list[str]:
    """Sub-folders of the ``folder_name`` model folders (registered on first use) that hold a file named
    ``marker`` (e.g. a Hugging Face model folder's ``config.json``), as posix paths relative to their
    model folder, sorted, for a combo widget. Walked as :func:`_list_files` walks (links followed,
    hidden names skipped, cached while no folder changes)."""
    names = set()
    for root in ensure_model_folder(folder_name):
        for name in _list_files(root, [os.path.splitext(marker)[1] or marker]):
            folder, _, base = name.rpartition("/")
            if base == marker and folder:
                names.add(folder)
    return sorted(names)


def resolve_model_path(folder_name: str, name: str) -> Path:
    """Absolute path of a file or folder named relative to one of the ``folder_name`` model folders
    (:func:`resolve_model_file` for folders too).

    Raises:
        ValueError: empty, or leaving the folder.
        FileNotFoundError: in none of the folders; the message names it and the folders.
    """
    return _find_in_model_folders(folder_name, name, Path.exists, "nothing selected: put a model in")


def next_output_path(filename_prefix: str, extension: str) -> tuple[Path, str]:
    """A fresh output file for ``filename_prefix`` (ComfyUI's counter naming).

    Args:
        filename_prefix: e.g. ``"mesh/mpod3d"``; may contain sub-folders and
            ComfyUI's ``%date%``-style variables; must stay inside ``output/``.
        extension: without the dot, e.g. ``"glb"``.

    Returns:
        (absolute path, path relative to the output folder in posix form).

    Raises:
        ValueError: an empty prefix, an absolute one, or one that leaves the output folder.
    """
    prefix = (filename_prefix or "").strip()
    if not prefix:
        raise ValueError("filename_prefix is empty")
    out_dir = os.path.abspath(output_directory())
    try:  # links kept, as ComfyUI's own save nodes check: output/ or a sub-folder may link elsewhere
        _inside(Path(out_dir), prefix, "output")
    except ValueError:
        raise ValueError(f"filename_prefix '{filename_prefix}' must be a relative name inside ComfyUI's "
                         "output folder (no absolute paths, no '..')") from None
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out_dir)
    name = f"{filename}_{counter:05}_.{extension}"
    relative = Path(subfolder, name).as_posix() if subfolder else name
    return Path(folder) / name, relative


def _preview_image(image: torch.Tensor) -> Image.Image:
    """(H, W, 3) float [0, 1] tensor -> PIL image for the node's live preview."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


class Progress:
    """Progress bar + live preview + interrupt, as one callback for core loops.

    ``progress(step, total, preview)``: ``preview`` is an optional (H, W, 3)
    float image; every call also checks for a user interrupt.
    """

    def __init__(self, total: int, preview_size: int = 512):
        self.bar = comfy.utils.ProgressBar(total)
        self.preview_size = preview_size

    def __call__(self, step: int, total: int, preview: Optional[torch.Tensor] = None) -> None:
        check_interrupt()
        shown = None
        if preview is not None:
            shown = ("JPEG", _preview_image(preview), self.preview_size)
        self.bar.update_absolute(step, total, shown)


ProgressCallback = Callable[[int, int, Optional[torch.Tensor]], None]


def node_text(text: str) -> None:
    """Show ``text`` on the executing node in the frontend (ComfyUI's progress text, as core nodes
    report sizes); nothing when no node is executing or no server runs (scripts, tests)."""
    from comfy_execution.utils import get_executing_context
    context = get_executing_context()
    try:
        from server import PromptServer
        server = PromptServer.instance
    except (ImportError, AttributeError):
        return
    if context is not None and server is not None:
        server.send_progress_text(text, context.node_id)
