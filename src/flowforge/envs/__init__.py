"""Adapters to robot simulators. MetaWorld needs the ``robot`` extra and is imported on use:
``from flowforge.envs.metaworld import MetaWorldEnv``."""
