"""Operations: the command line (``run``, ``check-config``, ``demo``, ``ids``, ``dlq``,
``inbox``) and the operators' commands on the dedup store."""
