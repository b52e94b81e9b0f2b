# The shared skeleton of fetch*.sh, sourced by each after it sets `dest` (the cache directory),
# `script` (its own path), `generator` (its reference generator) and defines `report`:
#   assets_begin        prints the report and exits when DEST already holds what this recipe
#                       makes; else makes the scratch directory $work (removed on exit)
#   pip_download ...    `pip download --no-deps` of binary wheels into $work/wheels
#   assets_reference    runs the generator over $work/models with $work/python importable
#   assets_finish       records the recipe and renames $work into place as DEST
# The recipe is the digest of the script, its generator and this file: change any of them and
# the next run refetches. Nothing is half-made: DEST appears whole or not at all.

python="${PYTHON:-python3}"

assets_begin() {
    recipe="$(cat "$script" "$generator" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$dest/models/reference.json" && "$(cat "$dest/recipe" 2>/dev/null)" == "$recipe" ]]; then
        report
        exit 0
    fi
    mkdir -p "$(dirname "$dest")"
    work="$(mktemp -d "$dest.tmp.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
}

pip_download() {
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --dest "$work/wheels" "$@"
}

assets_reference() {
    PYTHONPATH="$work/python" "$python" "$generator" "$work/models" > "$work/models/reference.json.part"
    mv "$work/models/reference.json.part" "$work/models/reference.json"
    rm -rf "$work/python" # only the reference needed it
}

assets_finish() {
    echo "$recipe" > "$work/recipe"
    rm -rf "$dest"
    mv "$work" "$dest"
    trap - EXIT
    report
}
