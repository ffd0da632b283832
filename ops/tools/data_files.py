"""Reading the data files users hand to the command line: JSON, or YAML where PyYAML is there."""
import json


def read_data(path, what):
    """The object held by the JSON (or ``.yaml``/``.yml``) file ``path``; ``what`` names its
    contents in errors ("layers", "benchmark cases"). Errors are ``ValueError``s naming the file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    if str(path).endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML needs PyYAML (pip install pyyaml); "
                             f"or give the {what} as JSON") from None
        return yaml.safe_load(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: expected JSON {what} ({e})") from None
