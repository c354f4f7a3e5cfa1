"""Family-neutral searches over recipes (``stillroom search-recipe``), registered through the
``stillroom`` entry point like every built-in; heavy imports happen inside the hook's function."""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from stillroom.search.command import search_recipe

    cli.add_command(search_recipe)
