"""Command-line pieces of the entry scripts: boolean flags, value checks, and the flags the repository adds to every
training script, declared once here. Each script keeps its official flags; a keyword argument says where a
script's version of a shared flag differs (a default, or the official boolean style). Nothing but argparse."""
import argparse
import operator
import re


def str2bool(value):
    """argparse type for the official scripts' `--flag=True` / `--flag false` booleans."""
    text = str(value).lower()
    if text in ('true', 't', 'yes', 'y', '1'):
        return True
    if text in ('false', 'f', 'no', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


def add_bool_arg(parser, name, default, help=None):
    """`--name` (= true), `--name true|false|True|False|1|0`."""
    parser.add_argument(name, type=str2bool, default=default, nargs='?', const=True, help=help)


def check_flags(args, rules):
    """Raises a ValueError naming the first flag whose value breaks its rule: an interval such as '(0, 1)' or
    '[0, --epochs]' (a bound may be another flag), or a bound such as '>= 1' or '> 0'. Flags left at None are not
    checked; each element of a list flag is."""
    for flag, rule in rules.items():
        value = getattr(args, _dest(flag))
        if not all(v is None or _allows(args, rule, v) for v in (value if isinstance(value, list) else [value])):
            refs = ', '.join(f'{ref} is {getattr(args, _dest(ref))}' for ref in re.findall(r'--\w+', rule))
            raise ValueError(f'{flag} {value}: must be {"in " if rule[0] in "[(" else ""}{rule}'
                             + (f' ({refs})' if refs else ''))


def _allows(args, rule, value):
    def bound(text):
        text = text.strip()
        return getattr(args, _dest(text)) if text.startswith('--') else float(text)

    if rule[0] in '[(':
        low, high = map(bound, rule[1:-1].split(','))
        above = low <= value if rule[0] == '[' else low < value
        return above and (value <= high if rule[-1] == ']' else value < high)
    op, limit = rule.split()
    return {'>=': operator.ge, '>': operator.gt}[op](value, bound(limit))


def _dest(flag):
    return flag.lstrip('-').replace('-', '_')


# ---------------------------------------------------------------- the flags every training script shares

def add_run_flags(parser, *, device='cuda', seed=0, pin_mem='bool', max_nonfinite=True, save_every_steps=True):
    """--device, --seed, --pin_mem, --max_nonfinite, --save_every_steps. `pin_mem`: 'bool' (`--pin_mem [true|false]`,
    default true), 'flags' (MAE's `--pin_mem` / `--no_pin_mem`, default true) or None (no such flag);
    `max_nonfinite`, `save_every_steps`: False where the script has no such flag."""
    parser.add_argument('--device', default=device, help='device to use for training / testing (cuda, cpu, ...)')
    parser.add_argument('--seed', default=seed, type=int, help='random seed')
    pin_help = "pin the data loaders' CPU memory when on CUDA (default: on)"
    if pin_mem == 'bool':
        add_bool_arg(parser, '--pin_mem', True, pin_help)
    elif pin_mem == 'flags':
        parser.add_argument('--pin_mem', action='store_true', help=pin_help)
        parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help="do not pin the loaders' memory")
        parser.set_defaults(pin_mem=True)
    elif pin_mem is not None:
        raise ValueError(f"pin_mem={pin_mem!r}: expected 'bool', 'flags' or None")
    if max_nonfinite:
        parser.add_argument('--max_nonfinite', type=int, default=5,
                            help='stop after this many non-finite steps in a row (they are skipped); 0 = never')
    if save_every_steps:
        parser.add_argument('--save_every_steps', default=0, type=int,
                            help='also write the resumable checkpoint every N optimizer steps, resumable inside the '
                                 'epoch')


def add_resume_flags(parser, *, resume=True, no_auto_resume=False, start_epoch=True):
    """--resume, --auto_resume, --no_auto_resume (MAE's scripts), --start_epoch; False where the script has no such
    flag (main_spark.py names its file --resume_from)."""
    if resume:
        parser.add_argument('--resume', default='',
                            help='checkpoint to resume from (else, with --auto_resume, the newest in the output '
                                 'folder)')
    add_bool_arg(parser, '--auto_resume', True, 'resume from the newest checkpoint in the output folder unless a '
                 'checkpoint to resume is given (default; --auto_resume false: start over)')
    if no_auto_resume:
        parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                            help='start over (= --auto_resume false)')
    if start_epoch:
        parser.add_argument('--start_epoch', default=0, type=int, metavar='N', help='first epoch (set by resuming)')


def add_launcher_flags(parser, *, world_size=False, dist_on_itp='flag'):
    """What launchers pass and the official command lines name (util/dist.py reads them): --world_size (where the
    official script has it), --local_rank / --local-rank, --dist_on_itp ('flag': store_true, 'bool': SLaK's
    `--dist_on_itp [true|false]`, None: no such flag), --dist_url."""
    if world_size:
        parser.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    parser.add_argument('--local_rank', '--local-rank', default=-1, type=int,
                        help='set by torch.distributed.launch (the LOCAL_RANK variable, when set, wins)')
    if dist_on_itp == 'flag':
        parser.add_argument('--dist_on_itp', action='store_true', help='launched by OpenMPI (OMPI_COMM_WORLD_*)')
    elif dist_on_itp == 'bool':
        add_bool_arg(parser, '--dist_on_itp', False, 'launched by OpenMPI (OMPI_COMM_WORLD_*)')
    elif dist_on_itp is not None:
        raise ValueError(f"dist_on_itp={dist_on_itp!r}: expected 'flag', 'bool' or None")
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
