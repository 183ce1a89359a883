#!/usr/bin/env bash
# On a machine WITH internet access: put every wheel the appliance needs into one folder, with
# SHA256SUMS and BUILD-INFO, to carry to an air-gapped site, where deploy/airgap/install.sh
# installs from it with `pip install --no-index`.
#
#   deploy/airgap/build-wheelhouse.sh [OUT]          OUT defaults to dist/wheelhouse
#
# Environment (all optional):
#   PYTHON           interpreter that builds and downloads (default python3, >= 3.11). Without the
#                    two TARGET_ settings the wheelhouse is for this interpreter and platform.
#   TARGET_PYTHON    e.g. 3.12: the air-gapped machine's Python, when it differs from PYTHON's
#   TARGET_PLATFORM  e.g. manylinux_2_28_x86_64: its platform tag (binary wheels only, then)
#   RFM_EXTRAS       extras to include, comma-separated (default: postgres; add tensorrt for GPU sites)
#   RFM_PROJECT      the project folder to package (default: this repository)
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project="$(cd "${RFM_PROJECT:-$here/../..}" && pwd)"
out="${1:-$project/dist/wheelhouse}"
python="${PYTHON:-python3}"
extras="${RFM_EXTRAS-postgres}"

command -v "$python" >/dev/null || die "$python not found (set PYTHON)"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "$python is older than 3.11"
[ -f "$project/pyproject.toml" ] || die "$project has no pyproject.toml (set RFM_PROJECT)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if compgen -G "$out/*.whl" >/dev/null; then
    die "$out already holds wheels: use an empty folder (one wheelhouse per release)"
fi

pip=("$python" -m pip --disable-pip-version-check)
target=()
if [ -n "${TARGET_PYTHON:-}${TARGET_PLATFORM:-}" ]; then
    # another interpreter or platform: pip can only take ready-made wheels for it
    target=(--only-binary=:all: --implementation cp)
    [ -n "${TARGET_PYTHON:-}" ] && target+=(--python-version "$TARGET_PYTHON")
    [ -n "${TARGET_PLATFORM:-}" ] && target+=(--platform "$TARGET_PLATFORM")
fi

echo "1/4 building the appliance's own wheel from $project"
# from a clean copy: setuptools reuses a build/ folder in the source tree, stale files included
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
tar -C "$project" -cf - --exclude=.git --exclude=.venv --exclude=venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=demo --exclude=wheelhouse . | tar -C "$src" -xf -
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$out" "$src"
shopt -s nullglob
own=("$out"/*.whl)
[ "${#own[@]}" -eq 1 ] || die "expected one project wheel in $out, found ${#own[@]}"
own="${own[0]}"
name="$(basename "$own" | cut -d- -f1 | tr _ -)"

echo "2/4 downloading $name's dependencies${extras:+ (extras: $extras)}"
spec="$own${extras:+[$extras]}"
"${pip[@]}" download --quiet --dest "$out" "${target[@]}" "$spec" pip

sdists=("$out"/*.tar.gz "$out"/*.zip)
if [ "${#sdists[@]}" -gt 0 ]; then
    # the site needs no compiler: build source-only packages into wheels here
    echo "3/4 building wheels for ${#sdists[@]} source-only package(s)"
    [ "${#target[@]}" -eq 0 ] || die "source-only packages cannot be built for another target: ${sdists[*]##*/}"
    "${pip[@]}" wheel --quiet --no-deps --wheel-dir "$out" "${sdists[@]}"
    rm -f "${sdists[@]}"
else
    echo "3/4 no source-only packages"
fi

py_tag="${TARGET_PYTHON:-$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
platform_tag="${TARGET_PLATFORM:-$("$python" -c 'import sysconfig; print(sysconfig.get_platform())')}"
version="$(basename "$own" | cut -d- -f2)"
cat > "$out/BUILD-INFO" <<INFO
package=$name
version=$version
extras=$extras
python=$py_tag
platform=$platform_tag
INFO

echo "4/4 writing SHA256SUMS"
(cd "$out" && rm -f SHA256SUMS && sha256sum -- *.whl BUILD-INFO > SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
count=$(ls "$out"/*.whl | wc -l)
size=$(du -sh "$out" | cut -f1)
echo "wheelhouse ready: $out ($count wheels, $size) for Python $py_tag on $platform_tag"
echo "carry it to the site, then: deploy/airgap/install.sh $out /opt/rfm/venv"
