#!/bin/bash
# Build the vfiod Debian package for one Debian release: dist/vfiod_<version>_amd64.deb, for that release's
# /usr/bin/python3 (bookworm: 3.11, trixie: 3.13; packaging/dists.toml says what each takes from Debian).
#
#   bash packaging/build-deb.sh [--dist bookworm|trixie] [--outdir DIR] [--builddir DIR] [--no-lintian]
#
# Output: DIR/vfiod_<version>_amd64.deb (default dist/; trixie's version ends in +deb13); scratch in
# --builddir (default _build/deb/DIST). Any Debian host builds either release's package.
#
# What it does:
#  1. bundles the release's pinned Python dependencies (its requirements file, sha256-checked) with
#     `pip install --target` into a private tree /usr/lib/vfiod, from a wheel cache in ~/.cache/vfiod/wheels
#     (filled from PyPI on first use; git-ignored), plus vfiod itself;
#  2. lays out every file of the "Files on a host" table (packaging/stage.py) and generates
#     debian/changelog (version from pyproject.toml) and debian/copyright (licenses of the wheels);
#  3. runs dpkg-buildpackage -b on a copy of packaging/debian in the build dir (debhelper compat 13:
#     dh_installsystemd --no-stop-on-upgrade, dh_installtmpfiles, the postinst creating group hypeman);
#  4. runs lintian (errors and warnings fail the build; overrides are in packaging/debian).
#
# Needs (Debian): dpkg-dev debhelper lintian python3 (and pip: the repo's .venv, or python3-pip).
# Environment: VFIOD_DEB_PYTHON=<python with pip> to choose the pip; VFIOD_DEB_NO_HASHES=1 to download
# without hash checking and print the hashes (only when updating packaging/requirements.txt).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=$REPO/dist
BUILD=
DIST=bookworm
LINTIAN=1
while [ $# -gt 0 ]; do
    case "$1" in
        --dist) DIST=$2; shift 2 ;;
        --dist=*) DIST=${1#--dist=}; shift ;;
        --outdir) OUTDIR=$2; shift 2 ;;
        --outdir=*) OUTDIR=${1#--outdir=}; shift ;;
        --builddir) BUILD=$2; shift 2 ;;
        --builddir=*) BUILD=${1#--builddir=}; shift ;;
        --no-lintian) LINTIAN=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "build-deb: ERROR: $*" >&2; exit 1; }
step() { echo "build-deb: $*" >&2; }

HOSTPY=/usr/bin/python3
for tool in "$HOSTPY" dpkg-buildpackage dh dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool not found: apt-get install dpkg-dev debhelper python3"
done
if [ "$LINTIAN" = 1 ]; then
    command -v lintian >/dev/null || die "lintian not found: apt-get install lintian (or pass --no-lintian)"
fi
[ -n "$BUILD" ] || BUILD=$REPO/_build/deb/$DIST

PIPPY=${VFIOD_DEB_PYTHON:-}
if [ -z "$PIPPY" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PIPPY=$REPO/.venv/bin/python; else PIPPY=$HOSTPY; fi
fi
"$PIPPY" -m pip --version >/dev/null 2>&1 || die "$PIPPY has no pip: run make venv, or apt-get install python3-pip"

STAGE=("$HOSTPY" "$REPO/packaging/stage.py")
VERSION=$("${STAGE[@]}" version "$DIST") || die "unknown --dist $DIST"
PYVER=$("${STAGE[@]}" field "$DIST" python)
ABI=$("${STAGE[@]}" field "$DIST" abi)
REQUIREMENTS=$REPO/$("${STAGE[@]}" field "$DIST" requirements)
"${STAGE[@]}" check-requirements "$DIST"
step "vfiod $VERSION for $DIST (python $PYVER)"

SRC=$BUILD/vfiod-$VERSION
PAYLOAD=$SRC/payload
PRIVATE=$PAYLOAD/usr/lib/vfiod
# Wheels are pinned by hash: one cache outside the clone serves every clone (and CI) on this machine.
CACHE=${VFIOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfiod/wheels}
started=$(date +%s)

# Only what this script makes in the build directory is removed (it may be a directory of the caller's).
mkdir -p "$BUILD"
rm -rf "$SRC" "$BUILD"/vfiod_"$VERSION"_* "$BUILD/dpkg-buildpackage.log"
mkdir -p "$PRIVATE" "$CACHE" "$OUTDIR"

# 1. Bundled dependencies: wheels for the release's CPython on x86_64 glibc (bookworm has glibc 2.36).
WHEEL_TARGET=(--only-binary=:all: --implementation cp --python-version "$PYVER" --abi "$ABI" --abi abi3 --abi none
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
HASHES=(--require-hashes)
[ "${VFIOD_DEB_NO_HASHES:-0}" = 1 ] && HASHES=()
pip_install() {
    "$PIPPY" -m pip install --quiet --no-deps --no-compile --disable-pip-version-check "${HASHES[@]}" \
        "${WHEEL_TARGET[@]}" --no-index --find-links "$CACHE" --target "$PRIVATE" \
        -r "$REQUIREMENTS"
}
if ! pip_install 2>/dev/null; then
    step "fetching the pinned wheels into $CACHE"
    "$PIPPY" -m pip download --quiet --no-deps --disable-pip-version-check "${HASHES[@]}" "${WHEEL_TARGET[@]}" \
        --dest "$CACHE" -r "$REQUIREMENTS" \
        || die "could not download the wheels of $REQUIREMENTS"
    rm -rf "$PRIVATE" && mkdir -p "$PRIVATE"
    pip_install || die "pip install --target of $REQUIREMENTS failed"
fi
if [ "${VFIOD_DEB_NO_HASHES:-0}" = 1 ]; then
    (cd "$CACHE" && sha256sum ./*.whl) >&2
fi
# pip's own bookkeeping that nothing reads here.
find "$PRIVATE" -maxdepth 2 \( -name INSTALLER -o -name REQUESTED -o -name direct_url.json \) -delete
rm -rf "$PRIVATE/bin"

# vfiod itself: the package's files as they are in the tree (no bytecode; postinst compiles).
for pkg in vfiod vfiod_sim; do [ -f "$REPO/$pkg/__init__.py" ] || die "$pkg/__init__.py not found in $REPO"; done
tar -C "$REPO" --exclude=__pycache__ --exclude='*.py[co]' -cf - vfiod vfiod_sim | tar -C "$PRIVATE" -xf -
find "$PRIVATE" -type d -exec chmod 0755 {} + && find "$PRIVATE" -type f -exec chmod 0644 {} +

# 2. Everything else the package ships, and the generated debian/ files.
"${STAGE[@]}" payload "$PAYLOAD"
cp -a "$REPO/packaging/debian" "$SRC/debian"
"${STAGE[@]}" debian "$SRC/debian" "$PAYLOAD" "$DIST"
rm -f "$SRC/debian/copyright.in"

# 3. The package. SOURCE_DATE_EPOCH comes from the generated changelog.
step "dpkg-buildpackage (log: $BUILD/dpkg-buildpackage.log)"
if ! (cd "$SRC" && dpkg-buildpackage -b -us -uc) >"$BUILD/dpkg-buildpackage.log" 2>&1; then
    tail -40 "$BUILD/dpkg-buildpackage.log" >&2
    die "dpkg-buildpackage failed"
fi
DEB=vfiod_${VERSION}_amd64.deb
[ -f "$BUILD/$DEB" ] || die "dpkg-buildpackage did not produce $DEB"
cp "$BUILD/$DEB" "$OUTDIR/$DEB"

# 4. lintian: errors and warnings fail; each override in packaging/debian/vfiod.lintian-overrides says why.
if [ "$LINTIAN" = 1 ]; then
    step "lintian"
    if ! lintian --fail-on error,warning --display-info --tag-display-limit 0 "$OUTDIR/$DEB" >&2; then
        die "lintian found errors or warnings in $OUTDIR/$DEB"
    fi
fi

step "built $OUTDIR/$DEB in $(($(date +%s) - started)) s"
echo "$OUTDIR/$DEB"
