"""Command line: parsing and dispatch only. The one place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mailgate import __version__, logsetup
from mailgate.config import ConfigError, Settings, load

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _serve(args: argparse.Namespace) -> int:
    settings = load(args.config)
    from mailgate import server

    if not settings.listeners:
        print(f"{args.config}: no [[listener]] configured", file=sys.stderr)
        return EXIT_USAGE
    logsetup.configure(settings.log_level, settings.log_file)
    return server.serve(settings)


def _check(args: argparse.Namespace) -> int:
    settings = load(args.config)
    from mailgate import preflight, server

    problems = preflight.problems(settings)  # what serve would fail on, all of it at once
    for problem in problems:
        print(f"mailgate: configuration error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    server.preflight(settings)  # what serve would load: certificates, CA, authenticator
    for listener in settings.listeners:
        methods = ",".join(listener.auth)
        print(f"{listener.protocol} on {listener.address} tls={listener.tls} auth={methods}")
    source = (
        "directory " + settings.directory.url.split("://")[0] if settings.directory else "auth_http"
    )
    print(f"{args.config}: ok ({len(settings.listeners)} listeners, {source})")
    return EXIT_OK


def _auth_server(args: argparse.Namespace) -> int:
    from mailgate import authserver, server
    from mailgate.auth.factory import build_authenticator

    settings = load(args.config)
    logsetup.configure(settings.log_level, settings.log_file)

    async def run() -> None:
        authenticator = build_authenticator(settings)
        try:
            await authserver.serve(settings, authenticator)
        finally:
            await authenticator.close()

    loop = server.new_loop()
    try:
        loop.run_until_complete(run())
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return EXIT_OK


def _import_nginx(args: argparse.Namespace) -> int:
    from mailgate.nginx_conf import NginxSyntaxError
    from mailgate.nginx_import import NginxImportError, import_file

    try:
        conversion = import_file(args.file)
    except NginxImportError as e:
        print(f"mailgate: {args.file}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except NginxSyntaxError as e:  # names file:line itself
        print(f"mailgate: {e}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(conversion.toml())
    for note in conversion.notes:
        print(note, file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgate", description="A mail login proxy.")
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    parser.add_argument("-c", "--config", metavar="FILE", help="mailgate.toml")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: "-c" may also come before the command without being reset here.
        p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    command("serve", _serve, "run the proxy")
    command("check", _check, "validate the configuration and exit")
    command("auth-server", _auth_server, "serve the nginx auth_http protocol over HTTP")
    nginx = command(
        "import-nginx",
        _import_nginx,
        "convert an nginx mail {} block to mailgate TOML (stdout); what could not be mapped "
        "goes to stderr",
    )
    nginx.add_argument("file", metavar="FILE", help="nginx.conf (includes are followed)")
    nginx.set_defaults(needs_config=False)
    from mailgate import cli_control

    cli_control.register(sub, load_settings)
    try:
        from mailgate import cli_admin
    except ImportError:  # the directory's extra dependencies are not installed
        pass
    else:
        cli_admin.register(sub, load_settings)
    return parser


def load_settings(path: str) -> Settings:
    return load(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "needs_config", True) and not args.config:
        parser.error("the configuration file is required: -c FILE")
    try:
        code: int = args.func(args)
        return code
    except ConfigError as e:
        print(f"mailgate: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except OSError as e:
        print(f"mailgate: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
