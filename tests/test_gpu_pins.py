"""The Dockerfile and requirements/gpu.txt agree: every package the image installs is pinned
there, the base image is the one it names, and the pins match the CPU environment's.

The image itself cannot be built here (no Docker, no registry access); these checks read the
two files as text."""
import importlib.metadata as md
import os
import re
import shlex

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_PINS = "requirements/gpu.txt"
# pip options whose next token is a value, not a package
VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "--config-settings", "-i",
                 "--index-url", "--extra-index-url", "-f", "--find-links"}


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def pins(text):
    """``name==version`` lines -> {canonical name: version}."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def directive(text, key):
    """The value of a ``# key: value`` line of gpu.txt."""
    found = re.findall(rf"^# {key}: (\S+)\s*$", text, re.M)
    assert len(found) == 1, f"{GPU_PINS} needs exactly one '# {key}: ...' line, found {found}"
    return found[0]


def run_segments(dockerfile):
    """Shell commands of every RUN instruction (continuations joined, split at && ; |)."""
    text = re.sub(r"\\\n", " ", dockerfile)
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    return [seg.strip() for run in runs for seg in re.split(r"&&|;|\|", run) if seg.strip()]


def pip_installs(dockerfile):
    """(options, packages) of each ``pip install`` in the Dockerfile."""
    out = []
    for seg in run_segments(dockerfile):
        if not re.search(r"\bpip install\b", seg):
            continue
        tokens = shlex.split(seg.split("pip install", 1)[1])
        opts, pkgs, skip = [], [], False
        for i, tok in enumerate(tokens):
            if skip:
                skip = False
                opts.append(tok)
            elif tok.startswith("-"):
                opts.append(tok)
                skip = tok in VALUE_OPTIONS
            else:
                pkgs.append(tok)
        out.append((opts, pkgs))
    return out


@pytest.fixture(scope="module")
def files():
    return read("Dockerfile"), read(GPU_PINS)


def test_the_image_and_the_cpu_environment_run_one_sglang_release(files):
    """The release the CPU suite tests (its HTTP routes, its weight-update API) is the one
    the GPU image runs: the image's tag, gpu.txt's pin and constraints.txt's pin agree."""
    dockerfile, gpu = files
    tag = re.fullmatch(r"lmsysorg/sglang:v(\S+?)-cu\d+",
                       re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)[0])
    cpu = pins(read("requirements/constraints.txt"))["sglang"]
    assert tag and tag.group(1) == pins(gpu)["sglang"] == cpu, (tag, pins(gpu)["sglang"], cpu)


def test_base_image_is_the_pinned_sglang_release(files):
    dockerfile, gpu = files
    image = directive(gpu, "image")
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert froms == [image], f"Dockerfile FROM {froms} != {GPU_PINS} image {image}"
    tag = re.fullmatch(r"lmsysorg/sglang:v(\d+\.\d+\.\d+(?:\.post\d+)?)-cu\d+", image)
    assert tag, f"{image}: expected a SGLang release tag lmsysorg/sglang:vX.Y.Z-cuNNN"
    assert pins(gpu)["sglang"] == tag.group(1), "sglang== pin differs from the image's tag"


def test_every_pip_install_takes_its_versions_from_gpu_txt(files):
    dockerfile, gpu = files
    pinned = pins(gpu)
    installs = pip_installs(dockerfile)
    assert len(installs) >= 4, installs  # deps, transformer-engine, apex, the project
    seen = set()
    for opts, pkgs in installs:
        assert GPU_PINS in opts, f"pip install {pkgs} does not pass -c {GPU_PINS}"
        for pkg in pkgs:
            if pkg == ".":
                assert "--no-deps" in opts, "the project installs with --no-deps"
                continue
            if pkg.startswith("apex @ git+"):
                # the commit is read from gpu.txt at build time
                assert pkg == "apex @ git+${APEX_SRC}", pkg
                assert "sed -n 's/^# apex: //p' requirements/gpu.txt" in dockerfile
                continue
            req = Requirement(pkg)
            assert not req.specifier and not req.url, \
                f"{pkg}: versions belong in {GPU_PINS}, not in the Dockerfile"
            name = canonicalize_name(req.name)
            assert name in pinned, f"the Dockerfile installs {req.name}, unpinned in {GPU_PINS}"
            seen.add(name)
    for name in ("megatron-core", "transformer-engine"):
        assert name in seen, f"the Dockerfile does not install {name}"


def test_no_other_installer_and_no_inline_versions(files):
    dockerfile, _ = files
    for seg in run_segments(dockerfile):
        assert not re.search(r"\b(apt-get|apt|conda|mamba|uv|npm)\b.*\binstall\b|git clone",
                             seg), f"unpinned installer in the Dockerfile: {seg}"
        if "pip install" in seg:
            assert not re.search(r"[=<>~]=\s*\d", seg), f"inline version in: {seg}"


def test_transformer_engine_is_built_against_the_image_torch(files):
    dockerfile, gpu = files
    te = [(o, p) for o, p in pip_installs(dockerfile)
          if any(canonicalize_name(Requirement(x).name) == "transformer-engine"
                 for x in p if not x.startswith("apex") and x != ".")]
    assert te and all("--no-build-isolation" in o for o, _ in te)
    assert any("[pytorch]" in x for _, p in te for x in p)
    pinned = pins(gpu)
    family = {n: v for n, v in pinned.items() if n.startswith("transformer-engine")}
    assert len(set(family.values())) == 1, f"transformer-engine packages differ: {family}"


def test_gpu_pins_agree_with_the_cpu_environment(files):
    _, gpu = files
    gpu_pins, cpu_pins = pins(gpu), pins(read("requirements/constraints.txt"))
    shared = set(gpu_pins) & set(cpu_pins)
    assert {"megatron-core", "sglang"} <= shared
    differ = {n: (gpu_pins[n], cpu_pins[n]) for n in shared if gpu_pins[n] != cpu_pins[n]}
    assert not differ, f"gpu.txt vs constraints.txt: {differ}"


def test_transformer_engine_is_one_megatron_core_supports(files):
    """megatron-core's own metadata names the transformer-engine range it works with."""
    _, gpu = files
    pinned = pins(gpu)
    assert md.version("megatron-core") == pinned["megatron-core"]  # same as the CPU env
    te_reqs = [Requirement(r) for r in md.requires("megatron-core")
               if canonicalize_name(Requirement(r).name) == "transformer-engine"]
    assert te_reqs, "megatron-core declares no transformer-engine requirement"
    version = Version(pinned["transformer-engine"])
    assert all(r.specifier.contains(version, prereleases=True) for r in te_reqs), \
        (version, [str(r.specifier) for r in te_reqs])


def test_apex_is_pinned_to_a_commit(files):
    _, gpu = files
    assert re.fullmatch(r"https://github\.com/NVIDIA/apex\.git@[0-9a-f]{40}",
                        directive(gpu, "apex"))
