"""One TOML configuration file for every role: /etc/meta169/meta169.toml.

Owns reading the file (:mod:`.file`), deriving its keys from the click commands
(:mod:`.schema`: one key per option, named as the long flag), converting and
checking every value through the option's own click type with the file's line in
each error (:mod:`.resolve`), handing a section to the command that runs as click's
``default_map`` (:mod:`.invocation`), printing the effective values with their
origins (:mod:`.show`) and keeping secrets out of output and argv (:mod:`.secrets`).

Precedence is click's: flag > META169_* environment variable > file > default.

Must not know what any option means or which commands exist beyond the table of
sections in :mod:`.schema`; the commands are handed in. Light on purpose: every
start of every role imports it, the proxy's in 1000 namespaces included.
"""

from __future__ import annotations

from meta169.config.file import DEFAULT_CONFIG_PATH, ConfigFile, parse_config_text, read_config_file
from meta169.config.invocation import STATE_KEY, LoadedConfig, apply_to_command, exposed_password_warning, load_config
from meta169.config.resolve import Issue, Resolved, check_config, resolve_section, resolve_top_level
from meta169.config.schema import COMMAND_SECTIONS, SECTIONS, assign_envvars, command_keys, env_name, option_key
from meta169.config.secrets import redact, redact_url, url_has_password, with_password

__all__ = [
    "COMMAND_SECTIONS",
    "DEFAULT_CONFIG_PATH",
    "SECTIONS",
    "STATE_KEY",
    "ConfigFile",
    "Issue",
    "LoadedConfig",
    "Resolved",
    "apply_to_command",
    "assign_envvars",
    "check_config",
    "command_keys",
    "env_name",
    "exposed_password_warning",
    "load_config",
    "option_key",
    "parse_config_text",
    "read_config_file",
    "redact",
    "redact_url",
    "resolve_section",
    "resolve_top_level",
    "url_has_password",
    "with_password",
]
