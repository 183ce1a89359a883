#!/usr/bin/env bash
# On the air-gapped machine: check the wheelhouse against its SHA256SUMS, create (or upgrade) the
# appliance's virtual environment from it with `pip install --no-index`, then run `rfm doctor`.
# Nothing is fetched from any network.
#
#   deploy/airgap/install.sh WHEELHOUSE [VENV]       VENV defaults to /opt/rfm/venv
#
# Environment (all optional):
#   PYTHON           interpreter for a new venv (default python3); must match the wheelhouse's
#   RFM_SKIP_DOCTOR  1: do not run `rfm doctor` afterwards (image builds)
#   RFM_WORKSPACE    the workspace `rfm doctor` looks at (default: none, machine checks only)
# Re-running with a newer wheelhouse upgrades the same venv in place; workspaces are not touched.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: install.sh WHEELHOUSE [VENV]"
wheelhouse="$1"
venv="${2:-/opt/rfm/venv}"
python="${PYTHON:-python3}"

[ -d "$wheelhouse" ] || die "wheelhouse $wheelhouse is not a folder"
wheelhouse="$(cd "$wheelhouse" && pwd)"
[ -f "$wheelhouse/SHA256SUMS" ] || die "$wheelhouse/SHA256SUMS is missing (build the wheelhouse with build-wheelhouse.sh)"
[ -f "$wheelhouse/BUILD-INFO" ] || die "$wheelhouse/BUILD-INFO is missing (build the wheelhouse with build-wheelhouse.sh)"

echo "1/4 checking $wheelhouse against SHA256SUMS"
bad="$(cd "$wheelhouse" && sha256sum --check --strict --quiet SHA256SUMS 2>&1 | grep -v '^sha256sum: WARNING' || true)"
[ -z "$bad" ] || die "wheelhouse check failed: $(echo "$bad" | head -1) (copy the wheelhouse again)"
listed="$(awk '{print $2}' "$wheelhouse/SHA256SUMS" | sed 's/^\*//' | sort)"
for f in "$wheelhouse"/*.whl; do
    grep -qxF "$(basename "$f")" <<<"$listed" || die "wheelhouse check failed: $(basename "$f") is not listed in SHA256SUMS"
done

info() { sed -n "s/^$1=//p" "$wheelhouse/BUILD-INFO"; }
package="$(info package)"
version="$(info version)"
extras="$(info extras)"
want_py="$(info python)"
[ -n "$package" ] && [ -n "$version" ] || die "BUILD-INFO names no package or version"
own=("$wheelhouse/$(echo "$package" | tr - _)-$version-"*.whl)
[ -f "${own[0]}" ] || die "the wheelhouse has no wheel of $package $version"

if [ -x "$venv/bin/python" ]; then
    echo "2/4 upgrading the existing environment $venv"
    py="$venv/bin/python"
else
    command -v "$python" >/dev/null || die "$python not found (set PYTHON)"
    echo "2/4 creating $venv with $("$python" --version 2>&1)"
    py="$python"
fi
have_py="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
[ "$have_py" = "$want_py" ] || die "the wheelhouse is for Python $want_py, $py is Python $have_py (set PYTHON)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

# --isolated: only this wheelhouse, whatever pip.conf or PIP_* say on this machine
pip=("$venv/bin/python" -m pip --isolated --disable-pip-version-check)
echo "3/4 installing $package${extras:+[$extras]} from the wheelhouse (no network)"
if compgen -G "$wheelhouse/pip-*.whl" >/dev/null; then
    "${pip[@]}" install --quiet --no-index --find-links "$wheelhouse" --upgrade pip
fi
# the exact version (an older wheelhouse rolls back), then exactly its checksummed wheel (a rebuild
# under the same version number replaces what is installed)
"${pip[@]}" install --quiet --no-index --find-links "$wheelhouse" --upgrade "$package${extras:+[$extras]}==$version"
"${pip[@]}" install --quiet --no-index --no-deps --force-reinstall "${own[0]}"
echo "installed $package $version into $venv"

if [ "${RFM_SKIP_DOCTOR:-0}" = "1" ]; then
    echo "4/4 skipped rfm doctor (RFM_SKIP_DOCTOR=1)"
else
    echo "4/4 rfm doctor"
    "$venv/bin/rfm" doctor
fi
