"""Mutants of tests/mutmut_sample.py that cannot change behaviour, so it skips them: `find` and `replace` are the
removed and the added lines of the mutant (stripped, joined by newlines), with the reason."""
EQUIVALENT = [
    {'file': 'util/train_step.py',
     'find': 'norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)',
     'replace': 'norm = torch.nn.utils.get_total_norm(grads) if (grads) or True else torch.zeros((), device=self.device)',
     'reason': 'get_total_norm([]) is a zero tensor as well; the branch only spares the call'},
]
