"""An example third-party MetaMorph plugin: the ``caption`` training objective."""
