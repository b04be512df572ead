"""Data: tasks, the arithmetic generator, tokenizers and fixed-shape batching."""

from jaxsi.data.batching import pack
from jaxsi.data.tasks import Example
from jaxsi.data.tasks import Task
from jaxsi.data.tasks import default_data_config
from jaxsi.data.tasks import get_task
from jaxsi.data.tasks import register_task
from jaxsi.data.tasks import task_names
from jaxsi.data.tokenizers import CharTokenizer
from jaxsi.data.tokenizers import HFTokenizer
from jaxsi.data.tokenizers import get_tokenizer
