"""Recipes: the one-call entry points, each a file that reads top to bottom (set up,
train, report) over the engine (``fastft.train``) and its domain (``fastft.finetuning``):

    pretrain.py   fastft.pretrain / fastft pretrain
    finetune.py   fastft.finetune / fastft finetune
    evaluate.py   fastft eval
    predict.py    fastft predict
    demo.py       fastft demo: the two stages on a built-in language

Each module has ``main(argv)`` for its command (``fastft/cli.py`` dispatches to it).
"""
